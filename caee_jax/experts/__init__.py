"""The expert-execution boundary: every way of running routed experts goes through `run_experts`.

Expert parallelism, offloading and the Pallas kernel wrap or implement this one function; none
re-implements routing or combining. Letters: N tokens, D hidden, E experts, F expert width, K top-k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from caee_jax.experts.capacity import capacity_for, run_capacity
from caee_jax.experts.dense import run_dense
from caee_jax.experts.loop import run_loop
from caee_jax.pallas import run_pallas
from caee_jax.routing.backend import ExpertBackend, ExpertWeights

__all__ = ["ExpertBackend", "ExpertWeights", "run_experts"]


def run_experts(
    x: jax.Array,
    topk_ids: jax.Array,
    topk_weights: jax.Array,
    keep_mask: jax.Array,
    weights: ExpertWeights,
    backend: ExpertBackend = ExpertBackend.LOOP,
    *,
    layer_index: jax.Array | None = None,
    capacity_factor: float = 2.0,
) -> jax.Array:
    """Combined routed-expert output [N, D] (dtype of x).

    x [N, D]; topk_ids [N, K] int (ids in [0, E)); topk_weights [N, K] float (combine weights);
    keep_mask [N, K] bool (False: the pair is not executed and contributes nothing).
    layer_index: when given, `weights` hold every layer's experts ([L, E, ...]) and this int scalar picks one.
      The loop and pallas backends then read only the active experts of that layer: slicing the layer out first
      (as a scan input would) makes XLA copy all of its experts on every call.
    capacity_factor: only for CAPACITY.
    """
    backend = ExpertBackend(backend)
    weights = ExpertWeights(*(jnp.asarray(w) for w in weights))
    with jax.named_scope(f"experts_{backend.value}"):
        if backend is ExpertBackend.LOOP:
            return run_loop(x, topk_ids, topk_weights, keep_mask, weights, layer_index=layer_index)
        if backend is ExpertBackend.PALLAS:
            return run_pallas(x, topk_ids, topk_weights, keep_mask, weights, layer_index=layer_index)
        if layer_index is not None:
            weights = ExpertWeights(*(w[layer_index] for w in weights))
        if backend is ExpertBackend.DENSE:
            return run_dense(x, topk_ids, topk_weights, keep_mask, weights)
        if backend is ExpertBackend.CAPACITY:
            num_tokens, top_k = topk_ids.shape
            capacity = capacity_for(num_tokens, top_k, weights.gate.shape[0], capacity_factor)
            return run_capacity(x, topk_ids, topk_weights, keep_mask, weights, capacity)
        raise ValueError(f"unknown expert backend {backend}")
