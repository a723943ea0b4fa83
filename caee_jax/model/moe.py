"""DeepSeekMoE: routed experts (stacked weights, run behind `run_experts`) plus always-on shared experts.

Letters: B batch, T tokens, D hidden, E experts, F expert width, K top-k.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from caee_jax.caee.compensation import mean_outputs
from caee_jax.caee.cost_model import expert_load
from caee_jax.caee.pruning import prune, uses_mean
from caee_jax.config import ModelConfig
from caee_jax.experts import ExpertWeights, run_experts
from caee_jax.model.execution import Execution
from caee_jax.model.layers import MLP, param
from caee_jax.model.router import route
from caee_jax.parallel.expert_parallel import expert_parallel_mesh, run_experts_parallel


class RouterBias(nnx.Variable):
    """`e_score_correction_bias` [E]: steers expert selection; set by load balancing, not by gradients."""


class ExpertMeans(nnx.Variable):
    """Each routed expert's calibrated mean output [E, D] f32 (`caee/expert_means.py`), for `mean`
    compensation. Not a checkpoint tensor: absent until set (`DeepseekV3.set_expert_means`), so checkpoint
    loading, export and conversion never see it."""


class Routing(NamedTuple):
    """What the router chose for each token: ids [B, T, K] int32, gate weights [B, T, K] f32; keep_mask
    [B, T, K] bool: the pairs that ran (pruning); dropped_pairs: int32 scalar, kept pairs that
    expert-parallel dispatch had no slot for; expert_sums: [E, D] f32 with `Execution(collect_expert_sums=True)`,
    else None."""

    topk_ids: jax.Array
    topk_weights: jax.Array
    keep_mask: jax.Array
    dropped_pairs: jax.Array
    expert_sums: jax.Array | None = None


def routing_counts(routing: Routing, num_experts: int, pruned: bool = True) -> jax.Array:
    """[4] int32, summed over the MoE layers of a model output's routing (leading layer axis): routed
    pairs, kept pairs, active experts before and after pruning. pruned=False (no rule): the experts are
    counted once."""
    active = jax.vmap(lambda ids, keep: jnp.sum(expert_load(ids, keep, num_experts).active))
    before = jnp.sum(active(routing.topk_ids, jnp.ones_like(routing.keep_mask)))
    after = jnp.sum(active(routing.topk_ids, routing.keep_mask)) if pruned else before
    return jnp.stack([routing.keep_mask.size, jnp.sum(routing.keep_mask), before, after]).astype(jnp.int32)


class MoE(nnx.Module):
    """Router + routed experts + shared experts (width moe_intermediate_size * n_shared_experts)."""

    def __init__(self, config: ModelConfig, dtype, *, rngs: nnx.Rngs):
        self.config = config
        d, e, f = config.hidden_size, config.n_routed_experts, config.moe_intermediate_size
        self.router = param(rngs, (d, e), ("embed", "router"), dtype)
        self.router_bias = RouterBias(jnp.zeros((e,), jnp.float32), logical_axes=("router",))
        self.gate_proj = param(rngs, (e, d, f), ("experts", "embed", "moe_ffw"), dtype)
        self.up_proj = param(rngs, (e, d, f), ("experts", "embed", "moe_ffw"), dtype)
        self.down_proj = param(rngs, (e, f, d), ("experts", "moe_ffw", "embed"), dtype)
        shared_width = f * config.n_shared_experts
        self.shared = nnx.data(
            MLP(d, shared_width, dtype, rngs=rngs, width_axis="shared_ffw") if shared_width else None
        )
        self.expert_means: ExpertMeans | None = nnx.data(None)

    @property
    def expert_weights(self) -> ExpertWeights:
        return ExpertWeights(self.gate_proj[...], self.up_proj[...], self.down_proj[...])

    def __call__(self, x: jax.Array, execution: Execution, layer: jax.Array | None = None) -> tuple[jax.Array, Routing]:
        """x [B, T, D] -> (output [B, T, D], routing).

        layer: set when the expert parameters hold the whole stack [L, E, ...] (see `run_experts`).
        Under a context mesh (`jax.set_mesh`) the routed experts run expert-parallel.
        """
        b, t, d = x.shape
        flat = x.reshape(b * t, d)
        topk_ids, topk_weights = route(flat, self.router[...], self.router_bias[...], self.config)
        mesh = expert_parallel_mesh()
        shards = 1 if mesh is None else mesh.shape["expert"]
        num_experts = self.config.n_routed_experts
        keep_mask, combine = prune(execution.pruning, execution.cost_table, topk_ids, topk_weights, num_experts, shards)
        y, dropped = self._routed(flat, topk_ids, combine, keep_mask, execution, layer, decode=t == 1)
        if uses_mean(execution.pruning):
            if self.expert_means is None:
                raise ValueError(
                    "compensation 'mean' needs calibrated per-expert mean outputs and this model has none: "
                    "make them with launch/calibrate_means.py, set them with caee_jax.caee.expert_means.load_means"
                )
            compensation = mean_outputs(self.expert_means[...], topk_ids, topk_weights, keep_mask)
            y = (y.astype(jnp.float32) + compensation).astype(y.dtype)
        sums = self._expert_sums(flat, topk_ids, execution, layer, t == 1) if execution.collect_expert_sums else None
        y = y.reshape(x.shape)
        if self.shared is not None:
            with jax.named_scope("shared_experts"):
                y = y + self.shared(x)
        k = topk_ids.shape[-1]
        routing = (topk_ids, topk_weights, keep_mask)
        return y, Routing(*(a.reshape(b, t, k) for a in routing), dropped, sums)

    def _routed(self, flat, topk_ids, weights, keep_mask, execution: Execution, layer, decode: bool):
        """The routed experts on flat [N, D] -> (y [N, D], dropped pairs: int32 scalar), expert-parallel
        under a context mesh (dispatch "auto": gather to decode, all_to_all otherwise)."""
        mesh = expert_parallel_mesh()
        args = (flat, topk_ids, weights, keep_mask, self.expert_weights, execution.backend)
        if mesh is None:
            return run_experts(*args, layer=layer), jnp.zeros((), jnp.int32)
        dispatch = execution.dispatch
        if dispatch == "auto":
            dispatch = "gather" if decode else "all_to_all"
        return run_experts_parallel(*args, dispatch=dispatch, capacity_factor=execution.ep_capacity_factor, layer=layer)

    def _expert_sums(self, flat, topk_ids, execution: Execution, layer, decode: bool) -> jax.Array:
        """[E, D] f32: each expert's unweighted output summed over its routed pairs (every top-k slot).

        Runs one row per (token, slot) pair, so it builds [N*K, D], never an output per expert and token.
        """
        with jax.named_scope("expert_sums"):
            execution = dataclasses.replace(execution, ep_capacity_factor=None)  # every pair counts: no drops
            k = topk_ids.shape[-1]
            pairs = jnp.repeat(flat, k, axis=0)  # [N*K, D]: row n*K + j is token n
            ids = topk_ids.reshape(-1, 1)
            ones = jnp.ones(ids.shape, jnp.float32)
            outputs, _ = self._routed(pairs, ids, ones, jnp.ones(ids.shape, bool), execution, layer, decode)
            return jax.ops.segment_sum(outputs.astype(jnp.float32), ids[:, 0], self.config.n_routed_experts)
