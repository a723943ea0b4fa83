"""DeepSeekMoE as four stages: route -> decide -> execute -> combine.

route    the router's native top-k (`model/router.py`)
decide   the pruning rule and cost model: which pairs run, with what weight (`caee/pruning.py`)
execute  the routed experts behind `run_experts`, expert-parallel under a mesh (`parallel/expert_parallel.py`)
combine  `mean` compensation for pruned slots, plus the always-on shared experts

With redundant expert replicas (an EPLB placement, `parallel/replicas.py`), route stays logical, each
pair is then mapped to one physical slot, decide prices CAEE's pairs by slot (`caee/pruning.py`), execute
runs slots, and combine and every statistic stay logical.

Each stage is a pure function under its own `jax.named_scope`; the static plan (`Execution`) and the
arrays are separate arguments. Letters: B batch, T tokens, N = B*T, D hidden, E experts, F expert width,
K top-k, P physical expert slots.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from caee_jax.caee.compensation import mean_outputs
from caee_jax.caee.importance import slot_scale, uses_importance
from caee_jax.caee.policy import Decision
from caee_jax.caee.pruning import decide, ranks_across_batch, uses_mean
from caee_jax.config import ModelConfig
from caee_jax.model.execution import DecisionScope, Execution
from caee_jax.model.layers import MLP, param
from caee_jax.model.router import route
from caee_jax.offload.cache import ExpertCache
from caee_jax.offload.execute import residency, run_offloaded
from caee_jax.parallel.expert_parallel import execute, expert_parallel_mesh, expert_shards
from caee_jax.parallel.replicas import SlotTables, gather_slots, logical_stack, to_slots
from caee_jax.parallel.rowwise import batchwide, rowwise
from caee_jax.routing.backend import ExpertWeights
from caee_jax.routing.ops import expert_load
from caee_jax.routing.storage import (
    FP8_DTYPE,
    Storage,
    block_dequantize,
    block_quantize,
    check_scales,
    scale_shape,
)


class RouterBias(nnx.Variable):
    """`e_score_correction_bias` [E]: steers expert selection; set by load balancing, not by gradients."""


class ExpertMeans(nnx.Variable):
    """Each routed expert's calibrated mean output [E, D] f32 (`caee/expert_means.py`), for `mean`
    compensation. Not a checkpoint tensor: absent until set (`DeepseekV3.set_expert_means`), so checkpoint
    loading, export and conversion never see it."""


class ExpertImportance(nnx.Variable):
    """Each routed expert's calibrated importance factor [E] f32 and the layer's sensitivity [] f32
    (`caee/importance.py`), for CAEE's `expert_importance` / `layer_sensitivity`. Absent until set
    (`DeepseekV3.set_importance`), like `ExpertMeans`."""


class ExpertSlots(nnx.Variable):
    """The replica tables of a placed model (`parallel/replicas.py`), int32 per MoE layer: slot_expert [P],
    expert_slots [E, R], routed_count [E]. Not checkpoint tensors: absent until `MoE.place_experts`."""


class Routing(NamedTuple):
    """What the router chose for each token: ids [B, T, K] int32, gate weights [B, T, K] f32; keep_mask
    [B, T, K] bool: the pairs that ran (pruning); dropped_pairs: int32 scalar, kept pairs that
    expert-parallel dispatch had no slot for; expert_sums: [E, D] f32 when the call collects them
    (`collect_expert_sums`), else None; residency: [E] int32 tier of each expert when the decision was
    made (offloaded experts, `offload.execute.residency`: 0 resident), else None; expert_sq_norms: [E] f32
    with `expert_sums`, every routed expert's squared output norm summed over its pairs, else None;
    slot_ids: [B, T, K] int32, the physical slot each pair ran on when the experts are replicated, else None."""

    topk_ids: jax.Array
    topk_weights: jax.Array
    keep_mask: jax.Array
    dropped_pairs: jax.Array
    expert_sums: jax.Array | None = None
    residency: jax.Array | None = None
    expert_sq_norms: jax.Array | None = None
    slot_ids: jax.Array | None = None


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


EXPERT_AXES = {"gate": ("experts", "embed", "moe_ffw"), "up": ("experts", "embed", "moe_ffw")}
EXPERT_AXES["down"] = ("experts", "moe_ffw", "embed")
SCALE_AXES = {name: tuple(f"{a}_blocks" if a != "experts" else a for a in axes) for name, axes in EXPERT_AXES.items()}


class MoE(nnx.Module):
    """Router + routed experts + shared experts (width moe_intermediate_size * n_shared_experts).

    weights: how the routed experts are stored (`routing/storage.py`; None: in `dtype`). fp8 adds
    {gate,up,down}_scale: float32 block scales [E, ceil(D/128), ceil(F/128)] ([E, ceil(F/128), ceil(D/128)]).
    """

    def __init__(self, config: ModelConfig, dtype, *, rngs: nnx.Rngs, weights: Storage | None = None):
        self.config = config
        d, e, f = config.hidden_size, config.n_routed_experts, config.moe_intermediate_size
        self.router = param(rngs, (d, e), ("embed", "router"), dtype)
        self.router_bias = RouterBias(jnp.zeros((e,), jnp.float32), logical_axes=("router",))
        weights = None if weights is None else Storage.parse(weights, "weights")
        shapes = {"gate": (e, d, f), "up": (e, d, f), "down": (e, f, d)}
        for name, shape in shapes.items():
            setattr(
                self, f"{name}_proj", param(rngs, shape, EXPERT_AXES[name], dtype if weights is None else weights.dtype)
            )
            scale = None
            if weights is not None and weights.scaled:
                scale = param(rngs, scale_shape(shape), SCALE_AXES[name], jnp.float32, ones=True)
            setattr(self, f"{name}_scale", nnx.data(scale))
        shared_width = f * config.n_shared_experts
        self.shared = nnx.data(
            MLP(d, shared_width, dtype, rngs=rngs, width_axis="shared_ffw") if shared_width else None
        )
        self.expert_means: ExpertMeans | None = nnx.data(None)
        self.expert_importance: ExpertImportance | None = nnx.data(None)
        self.layer_sensitivity: ExpertImportance | None = nnx.data(None)
        self.slot_expert: ExpertSlots | None = nnx.data(None)
        self.expert_slots: ExpertSlots | None = nnx.data(None)
        self.routed_count: ExpertSlots | None = nnx.data(None)

    @property
    def expert_weights(self) -> ExpertWeights:
        return ExpertWeights(self.gate_proj[...], self.up_proj[...], self.down_proj[...])

    @property
    def expert_scales(self) -> ExpertWeights | None:
        """The block scales of fp8-stored experts, else None."""
        if self.gate_scale is None:
            return None
        return ExpertWeights(self.gate_scale[...], self.up_scale[...], self.down_scale[...])

    def check_scales(self, prefix: str) -> None:
        """ValueError naming the tensor (`prefix`.name) for fp8 weights without scales, or scales of the wrong
        shape or not finite and positive (concrete values only: not under jit or eval_shape)."""
        for name in EXPERT_AXES:
            variable, scale = getattr(self, f"{name}_proj"), getattr(self, f"{name}_scale")
            if scale is None and variable.dtype == FP8_DTYPE:
                raise ValueError(f"{prefix}.{name}_proj: {variable.dtype} weights without block scales")
            if scale is not None:
                check_scales(f"{prefix}.{name}_scale", variable.shape, scale[...])

    def store_experts(self, weights: Storage | str) -> None:
        """Re-stores the routed experts as `weights` (fp8: `block_quantize`; from fp8: dequantised first)."""
        weights = Storage.parse(weights, "weights")
        for name in EXPERT_AXES:
            variable, scale = getattr(self, f"{name}_proj"), getattr(self, f"{name}_scale")
            value = variable[...]
            if scale is not None:
                value = block_dequantize(value, scale[...], jnp.float32)
            scale = None
            if weights.scaled:
                value, scale_value = block_quantize(value)
                axes = ("layers", *SCALE_AXES[name]) if value.ndim == 4 else SCALE_AXES[name]
                scale = nnx.Param(scale_value, logical_axes=axes, init="ones")
            # New variables, not set_value: a copy of this module (nnx.merge of its split) shares them.
            setattr(self, f"{name}_proj", variable.replace(value.astype(weights.dtype)))
            setattr(self, f"{name}_scale", nnx.data(scale))

    def place_experts(self, tables: SlotTables | None) -> None:
        """On a stack of MoE layers ([L, E, ...] experts): holds the routed experts (and fp8 scales) as the
        physical slots of `tables` [L, P, ...], each slot a copy of its expert, and routes by the tables;
        None returns to one slot per expert. A placed stack is first taken back to its logical experts."""
        for name in EXPERT_AXES:
            for kind in ("proj", "scale"):
                variable = getattr(self, f"{name}_{kind}")
                if variable is None:
                    continue
                value = variable[...]
                if self.expert_slots is not None:
                    value = logical_stack(value, self.expert_slots[...])
                if tables is not None:
                    value = gather_slots(value, jnp.asarray(tables.slot_expert))
                # New variables, not set_value: a copy of this module (nnx.merge of its split) shares them.
                setattr(self, f"{name}_{kind}", variable.replace(value))
        axes = {"slot_expert": ("layers", "slots"), "routed_count": ("layers", "router")}
        axes["expert_slots"] = ("layers", "router", "replicas")
        for field, logical_axes in axes.items():
            table = None if tables is None else jnp.asarray(getattr(tables, field))
            setattr(self, field, nnx.data(None if table is None else ExpertSlots(table, logical_axes=logical_axes)))

    @property
    def num_slots(self) -> int:
        """Physical expert slots P (E without replicas)."""
        return self.gate_proj.shape[-3]

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
          compensation (`calibration/expert_means.py`), and `Routing.expert_sq_norms` [E] f32. Runs the
          routed experts a second time.
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
        router = functools.partial(route, config=self.config)
        topk_ids, topk_weights = rowwise(router, (flat,), (self.router[...], self.router_bias[...]))
        k = topk_ids.shape[-1]
        routed = None if valid is None else jnp.broadcast_to(valid[:, None, None], (b, t, k)).reshape(b * t, k)
        mesh = expert_parallel_mesh()
        shards = expert_shards(mesh)
        manager = execution.offload
        tiers = None if expert_cache is None else residency(expert_cache, layer_index, manager)
        slot_ids = None
        if self.expert_slots is not None:
            if expert_cache is not None:
                raise ValueError("offloaded experts have no replicas; this model is placed with an EPLB placement")
            with jax.named_scope("replicas"):
                slot_ids = to_slots(topk_ids, self.expert_slots[...], self.routed_count[...])
        decision = self._decide(execution, topk_ids, topk_weights, shards, tiers, routed, slot_ids)
        if execution.prune_layers is not None:
            decision = _only_in_layers(decision, topk_weights, layer_index, execution.prune_layers)
        placed = dict(mesh=mesh, layer_index=layer_index, decode=t == 1)
        if expert_cache is None:
            y, dropped = execute(
                flat,
                topk_ids if slot_ids is None else slot_ids,
                decision.weights,
                decision.keep_mask,
                self.expert_weights,
                execution.backend,
                dispatch=execution.dispatch,
                capacity_factor=execution.ep_capacity_factor,
                scales=self.expert_scales,
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
        sums, sq_norms = (None, None)
        if collect_sums:
            sums, sq_norms = self._expert_sums(flat, topk_ids, slot_ids, execution, placed, routed)
        routing = (topk_ids, topk_weights, decision.keep_mask)
        slots = None if slot_ids is None else slot_ids.reshape(b, t, k)
        routing = Routing(*(a.reshape(b, t, k) for a in routing), dropped, sums, tiers, sq_norms, slots)
        return y, routing, expert_cache

    def _decide(self, execution: Execution, topk_ids, topk_weights, shards: int, tiers, routed, slot_ids) -> Decision:
        """The decide stage. A rule that ranks pairs across the batch (CAEE, `capacity`) decides, on a batch
        split over devices, on the whole batch gathered once (`batchwide`: the one-device decision in one
        collective) or on each device's tokens alone (`execution.decision_scope`). Per-token rules are left
        to XLA, which splits them along the batch by itself. slot_ids [N, K] or None: each pair's replica
        slot on a placed model (CAEE then prices slots, with the importance factor per slot)."""
        rule, table, num_experts = execution.pruning, execution.cost_table, self.config.n_routed_experts
        scale = self._importance_scale(rule)
        if scale is not None and slot_ids is not None:
            scale = scale[self.slot_expert[...]]

        def decide_rows(ids, weights, routed, slots, factor):
            inputs = (ids, weights, num_experts, shards, tiers, factor, routed)
            return decide(rule, table, *inputs, slot_ids=slots, num_slots=self.num_slots)

        rows = (topk_ids, topk_weights, routed, slot_ids)
        if not ranks_across_batch(rule):
            return decide_rows(*rows, scale)
        spread = batchwide if execution.decision_scope is DecisionScope.BATCH else rowwise
        return spread(decide_rows, rows, (scale,))

    def _importance_scale(self, rule) -> jax.Array | None:
        """CAEE's calibrated importance factor per expert [E] f32 for the options the rule turns on, else None."""
        if not uses_importance(rule):
            return None
        if self.expert_importance is None:
            raise ValueError(
                "CAEE expert_importance / layer_sensitivity need an importance calibration and this model has none: "
                "make it with launch/calibrate_importance.py, set it with caee_jax.caee.importance.load_importance"
            )
        return slot_scale(rule, self.expert_importance[...], self.layer_sensitivity[...])

    def _add_mean_outputs(self, y, topk_ids, topk_weights, keep_mask) -> jax.Array:
        """y [N, D] plus each pruned slot's calibrated mean output, weighted by its gate weight."""
        if self.expert_means is None:
            raise ValueError(
                "compensation 'mean' needs calibrated per-expert mean outputs and this model has none: "
                "make them with launch/calibrate_means.py, set them with caee_jax.caee.expert_means.load_means"
            )
        compensation = mean_outputs(self.expert_means[...], topk_ids, topk_weights, keep_mask)
        return (y.astype(jnp.float32) + compensation).astype(y.dtype)

    def _expert_sums(
        self, flat, topk_ids, slot_ids, execution: Execution, placed: dict, routed
    ) -> tuple[jax.Array, jax.Array]:
        """([E, D] f32, [E] f32): each expert's unweighted output, and its squared norm, summed over its
        routed pairs (every top-k slot of the real rows, `routed` [N, K] or None: all); with replicas the
        pairs run on their slots (slot_ids [N, K]) and are summed by logical expert.

        Runs one row per (token, slot) pair, so it builds [N*K, D], never an output per expert and token;
        expert-parallel all_to_all gets a capacity that drops no pair.
        """
        with jax.named_scope("expert_sums"):
            k = topk_ids.shape[-1]
            pairs = jnp.repeat(flat, k, axis=0)  # [N*K, D]: row n*K + j is token n
            ids = topk_ids.reshape(-1, 1)
            run_ids = ids if slot_ids is None else slot_ids.reshape(-1, 1)
            ones = jnp.ones(ids.shape, jnp.float32)
            everything = jnp.ones(ids.shape, bool) if routed is None else routed.reshape(-1, 1)
            args = (pairs, run_ids, ones, everything, self.expert_weights, execution.backend)
            placed = dict(placed, scales=self.expert_scales)
            outputs, _ = execute(*args, dispatch=execution.dispatch, capacity_factor=None, **placed)
            outputs = outputs.astype(jnp.float32)
            num_experts = self.config.n_routed_experts
            sq_norms = jnp.sum(jnp.square(outputs), axis=-1)  # [N*K]
            return (
                jax.ops.segment_sum(outputs, ids[:, 0], num_experts),
                jax.ops.segment_sum(sq_norms, ids[:, 0], num_experts),
            )


def _only_in_layers(decision: Decision, topk_weights, layer_index, layers: tuple[int, ...]) -> Decision:
    """The decision in the MoE layers listed (0-based among the MoE layers); every slot kept elsewhere."""
    if layer_index is None:
        raise ValueError("Execution.prune_layers needs the stacked MoE layers (not an offloaded model)")
    on = jnp.isin(layer_index, jnp.asarray(layers))
    return Decision(jnp.where(on, decision.keep_mask, True), jnp.where(on, decision.weights, topk_weights))
