"""DeepSeekMoE as four stages: route -> decide -> execute -> combine.

route    the router's native top-k (`model/router.py`)
decide   the pruning rule and cost model: which pairs run, with what weight (`caee/pruning.py`)
execute  the routed experts behind `run_experts`, expert-parallel under a mesh (`parallel/expert_parallel.py`)
combine  `mean` compensation for pruned slots, plus the always-on shared experts

Each stage is a pure function under its own `jax.named_scope`; the static plan (`Execution`) and the
arrays are separate arguments. Letters: B batch, T tokens, N = B*T, D hidden, E experts, F expert width,
K top-k.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from caee_jax.caee.compensation import mean_outputs
from caee_jax.caee.pruning import decide, uses_mean
from caee_jax.config import ModelConfig
from caee_jax.model.execution import Execution
from caee_jax.model.layers import MLP, param
from caee_jax.model.router import route
from caee_jax.offload.cache import ExpertCache
from caee_jax.offload.execute import residency, run_offloaded
from caee_jax.parallel.expert_parallel import execute, expert_parallel_mesh, expert_shards
from caee_jax.parallel.rowwise import rowwise
from caee_jax.routing.backend import ExpertWeights
from caee_jax.routing.ops import expert_load


class RouterBias(nnx.Variable):
    """`e_score_correction_bias` [E]: steers expert selection; set by load balancing, not by gradients."""


class ExpertMeans(nnx.Variable):
    """Each routed expert's calibrated mean output [E, D] f32 (`caee/expert_means.py`), for `mean`
    compensation. Not a checkpoint tensor: absent until set (`DeepseekV3.set_expert_means`), so checkpoint
    loading, export and conversion never see it."""


class Routing(NamedTuple):
    """What the router chose for each token: ids [B, T, K] int32, gate weights [B, T, K] f32; keep_mask
    [B, T, K] bool: the pairs that ran (pruning); dropped_pairs: int32 scalar, kept pairs that
    expert-parallel dispatch had no slot for; expert_sums: [E, D] f32 when the call collects them
    (`collect_expert_sums`), else None; residency: [E] int32 tier of each expert when the decision was
    made (offloaded experts, `offload.execute.residency`: 0 resident), else None."""

    topk_ids: jax.Array
    topk_weights: jax.Array
    keep_mask: jax.Array
    dropped_pairs: jax.Array
    expert_sums: jax.Array | None = None
    residency: jax.Array | None = None


def routing_counts(routing: Routing, num_experts: int, pruned: bool = True, valid: jax.Array | None = None):
    """[4] int32, summed over the MoE layers of a model output's routing (leading layer axis): routed
    pairs, kept pairs, active experts before and after pruning. pruned=False (no rule): the experts are
    counted once. valid [B] bool: only these rows count (a padded batch's real rows; None: all)."""
    shape = routing.keep_mask.shape  # [L, B, T, K]
    routed = jnp.ones(shape, bool) if valid is None else jnp.broadcast_to(valid[None, :, None, None], shape)
    active = jax.vmap(lambda ids, keep: jnp.sum(expert_load(ids, keep, num_experts).active))
    before = jnp.sum(active(routing.topk_ids, routed))
    after = jnp.sum(active(routing.topk_ids, routing.keep_mask)) if pruned else before
    return jnp.stack([jnp.sum(routed), jnp.sum(routing.keep_mask), before, after]).astype(jnp.int32)


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

    def __call__(
        self,
        x: jax.Array,
        execution: Execution,
        layer_index: jax.Array | None = None,
        *,
        collect_expert_sums: bool = False,
        valid: jax.Array | None = None,
    ) -> tuple[jax.Array, Routing]:
        """x [B, T, D] -> (output [B, T, D], routing).

        layer_index: set when the expert parameters hold the whole stack [L, E, ...] (see `run_experts`).
        Under a context mesh (`jax.set_mesh`) the routed experts run expert-parallel.
        collect_expert_sums: also return `Routing.expert_sums` [E, D] f32, every routed expert's unweighted
          output summed over its (token, expert) pairs, pruned or not: the calibration of `mean`
          compensation (`calibration/expert_means.py`). Runs the routed experts a second time.
        valid: [B] bool, the real rows of a padded batch (None: all): a dummy row's pairs never run, are
          never kept (`Routing.keep_mask`) and count in no pruning decision.
        """
        y, routing, _ = self._stages(x, execution, layer_index, collect_expert_sums, None, valid=valid)
        return y, routing

    def offloaded(
        self,
        x: jax.Array,
        execution: Execution,
        layer_index: jax.Array,
        expert_cache: ExpertCache,
        next_router,
        valid: jax.Array | None = None,
    ) -> tuple[jax.Array, Routing, ExpertCache]:
        """Like `__call__` with the routed experts in an expert store behind the device cache
        (`execution.offload`): decide sees each expert's residency, execute fetches kept misses.
        next_router: (weight [D, E], bias [E], exists: bool scalar) of the next MoE layer, applied to x to
        predict which of its experts to prefetch while this layer computes. valid: as in `__call__`."""
        flat = x.reshape(-1, x.shape[-1])
        weight, bias, exists = next_router
        predicted_ids, _ = route(flat, weight, bias, self.config)
        load = expert_load(predicted_ids, jnp.ones(predicted_ids.shape, bool), self.config.n_routed_experts)
        return self._stages(x, execution, layer_index, False, expert_cache, load.active & exists, valid)

    def _stages(
        self, x, execution: Execution, layer_index, collect_sums: bool, expert_cache, next_hint=None, valid=None
    ):
        b, t, d = x.shape
        flat = x.reshape(b * t, d)
        num_experts = self.config.n_routed_experts
        router = functools.partial(route, config=self.config)
        topk_ids, topk_weights = rowwise(router, (flat,), (self.router[...], self.router_bias[...]))
        k = topk_ids.shape[-1]
        routed = None if valid is None else jnp.broadcast_to(valid[:, None, None], (b, t, k)).reshape(b * t, k)
        mesh = expert_parallel_mesh()
        shards = expert_shards(mesh)
        manager = execution.offload
        tiers = None if expert_cache is None else residency(expert_cache, layer_index, manager)
        rule, table = execution.pruning, execution.cost_table
        decision = decide(rule, table, topk_ids, topk_weights, num_experts, shards, tiers, routed)
        placed = dict(mesh=mesh, layer_index=layer_index, decode=t == 1)
        if expert_cache is None:
            y, dropped = execute(
                flat,
                topk_ids,
                decision.weights,
                decision.keep_mask,
                self.expert_weights,
                execution.backend,
                dispatch=execution.dispatch,
                capacity_factor=execution.ep_capacity_factor,
                **placed,
            )
        else:
            if mesh is not None:
                raise ValueError("offloaded experts run on one device; this call has a mesh")
            args = (flat, topk_ids, decision.weights, decision.keep_mask, expert_cache, layer_index, manager)
            y, expert_cache = run_offloaded(*args, next_hint)
            dropped = jnp.zeros((), jnp.int32)
        with jax.named_scope("combine"):
            if uses_mean(execution.pruning):
                y = self._add_mean_outputs(y, topk_ids, topk_weights, decision.keep_mask)
            y = y.reshape(x.shape)
            if self.shared is not None:
                y = y + self.shared(x)
        sums = self._expert_sums(flat, topk_ids, execution, placed, routed) if collect_sums else None
        routing = (topk_ids, topk_weights, decision.keep_mask)
        return y, Routing(*(a.reshape(b, t, k) for a in routing), dropped, sums, tiers), expert_cache

    def _add_mean_outputs(self, y, topk_ids, topk_weights, keep_mask) -> jax.Array:
        """y [N, D] plus each pruned slot's calibrated mean output, weighted by its gate weight."""
        if self.expert_means is None:
            raise ValueError(
                "compensation 'mean' needs calibrated per-expert mean outputs and this model has none: "
                "make them with launch/calibrate_means.py, set them with caee_jax.caee.expert_means.load_means"
            )
        compensation = mean_outputs(self.expert_means[...], topk_ids, topk_weights, keep_mask)
        return (y.astype(jnp.float32) + compensation).astype(y.dtype)

    def _expert_sums(self, flat, topk_ids, execution: Execution, placed: dict, routed) -> jax.Array:
        """[E, D] f32: each expert's unweighted output summed over its routed pairs (every top-k slot of
        the real rows, `routed` [N, K] or None: all).""

        Runs one row per (token, slot) pair, so it builds [N*K, D], never an output per expert and token;
        expert-parallel all_to_all gets a capacity that drops no pair.
        """
        with jax.named_scope("expert_sums"):
            k = topk_ids.shape[-1]
            pairs = jnp.repeat(flat, k, axis=0)  # [N*K, D]: row n*K + j is token n
            ids = topk_ids.reshape(-1, 1)
            ones = jnp.ones(ids.shape, jnp.float32)
            everything = jnp.ones(ids.shape, bool) if routed is None else routed.reshape(-1, 1)
            args = (pairs, ids, ones, everything, self.expert_weights, execution.backend)
            outputs, _ = execute(*args, dispatch=execution.dispatch, capacity_factor=None, **placed)
            return jax.ops.segment_sum(outputs.astype(jnp.float32), ids[:, 0], self.config.n_routed_experts)
