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
from caee_jax.routing.storage import FP8_DTYPE, scale_shape

__all__ = ["ExpertBackend", "ExpertWeights", "check_storage", "run_experts"]


def check_storage(weights: ExpertWeights, scales: ExpertWeights | None, backend: ExpertBackend) -> None:
    """ValueError naming the tensor when `backend` cannot run these weights: fp8 weights without block
    scales, scales of the wrong shape, or block-scaled weights on a backend other than LOOP."""
    for name, w in zip(ExpertWeights._fields, weights, strict=True):
        if w.dtype == FP8_DTYPE and scales is None:
            raise ValueError(f"routed expert weights {name} are {w.dtype} without block scales ({name}_scale)")
    if scales is None:
        return
    if not backend.runs_fp8:
        raise ValueError(
            f"backend {backend.value!r} cannot run fp8-stored experts (block scales); use 'loop' or 'pallas', "
            "or store the experts as f32/bf16"
        )
    for name, w, s in zip(ExpertWeights._fields, weights, scales, strict=True):
        if w.dtype != FP8_DTYPE:
            raise ValueError(f"routed expert weights {name} are {w.dtype} but come with block scales ({name}_scale)")
        if tuple(s.shape) != scale_shape(w.shape):
            raise ValueError(
                f"{name}_scale: block scales of shape {tuple(s.shape)} for weights {tuple(w.shape)}; "
                f"need {scale_shape(w.shape)}"
            )


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
    scales: ExpertWeights | None = None,
    tile_rows: int | None = None,
) -> jax.Array:
    """Combined routed-expert output [N, D] (dtype of x).

    x [N, D]; topk_ids [N, K] int (ids in [0, E)); topk_weights [N, K] float (combine weights);
    keep_mask [N, K] bool (False: the pair is not executed and contributes nothing).
    layer_index: when given, `weights` hold every layer's experts ([L, E, ...]) and this int scalar picks one.
      The loop and pallas backends then read only the active experts of that layer: slicing the layer out first
      (as a scan input would) makes XLA copy all of its experts on every call.
    capacity_factor: only for CAPACITY.
    tile_rows: LOOP's row tile; None: from this call's pairs and experts (under expert parallelism the caller
      passes the whole model's, `ExpertBackend.row_tile`: a device's share of experts would oversize it).
    scales: block scales of fp8-stored weights (`routing/storage.py`), shaped like `weights` with the last
      two axes in 128 x 128 blocks; LOOP dequantises them per active expert, PALLAS per weight tile in the
      kernel. Weights in another dtype than x are widened to it per active expert (LOOP), per tile in the
      kernel (PALLAS) or as they are read (the others).
    """
    backend = ExpertBackend(backend)
    weights = ExpertWeights(*(jnp.asarray(w) for w in weights))
    check_storage(weights, scales, backend)
    with jax.named_scope(f"experts_{backend.value}"):
        if backend is ExpertBackend.LOOP:
            return run_loop(
                x, topk_ids, topk_weights, keep_mask, weights, tile_rows, layer_index=layer_index, scales=scales
            )
        if backend is ExpertBackend.PALLAS:
            return run_pallas(x, topk_ids, topk_weights, keep_mask, weights, layer_index=layer_index, scales=scales)
        if layer_index is not None:
            weights = ExpertWeights(*(w[layer_index] for w in weights))
        if backend is ExpertBackend.DENSE:
            return run_dense(x, topk_ids, topk_weights, keep_mask, weights)
        if backend is ExpertBackend.CAPACITY:
            num_tokens, top_k = topk_ids.shape
            capacity = capacity_for(num_tokens, top_k, weights.gate.shape[0], capacity_factor)
            return run_capacity(x, topk_ids, topk_weights, keep_mask, weights, capacity)
        raise ValueError(f"unknown expert backend {backend}")
