"""DeepSeekMoE: routed experts (stacked weights, run behind `run_experts`) plus always-on shared experts.

Letters: B batch, T tokens, D hidden, E experts, F expert width, K top-k.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from caee_jax.caee.pruning import prune
from caee_jax.config import ModelConfig
from caee_jax.experts import ExpertWeights, run_experts
from caee_jax.model.execution import Execution
from caee_jax.model.layers import MLP, param
from caee_jax.model.router import route
from caee_jax.parallel.expert_parallel import expert_parallel_mesh, run_experts_parallel


class RouterBias(nnx.Variable):
    """`e_score_correction_bias` [E]: steers expert selection; set by load balancing, not by gradients."""


class Routing(NamedTuple):
    """What the router chose for each token: ids [B, T, K] int32, gate weights [B, T, K] f32; keep_mask
    [B, T, K] bool: the pairs that ran (pruning); dropped_pairs: int32 scalar, kept pairs that
    expert-parallel dispatch had no slot for."""

    topk_ids: jax.Array
    topk_weights: jax.Array
    keep_mask: jax.Array
    dropped_pairs: jax.Array


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
        dropped = jnp.zeros((), jnp.int32)
        args = (flat, topk_ids, combine, keep_mask, self.expert_weights, execution.backend)
        if mesh is None:
            y = run_experts(*args, layer=layer)
        else:
            dispatch = execution.dispatch
            if dispatch == "auto":
                dispatch = "gather" if t == 1 else "all_to_all"
            y, dropped = run_experts_parallel(
                *args, dispatch=dispatch, capacity_factor=execution.ep_capacity_factor, layer=layer
            )
        y = y.reshape(x.shape)
        if self.shared is not None:
            with jax.named_scope("shared_experts"):
                y = y + self.shared(x)
        k = topk_ids.shape[-1]
        routing = (topk_ids, topk_weights, keep_mask)
        return y, Routing(*(a.reshape(b, t, k) for a in routing), dropped)
