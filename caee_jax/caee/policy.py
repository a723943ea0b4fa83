"""The CAEE policy: per token, skip low-importance, high-cost slots, only on devices that bound the layer.

Pure jnp with static shapes, run inside the MoE layer between the router and expert execution:

1. Candidates: a token's native top-k slots, except its `k_min` highest-weight slots (never pruned).
2. Importance: the slot's share of the token's gate mass, times K (1 = an average slot); optionally
   times a calibrated factor per expert and layer (`caee/importance.py`): the typical norm of the
   expert's output (`expert_importance`) and the layer's sensitivity (`layer_sensitivity`).
3. Cost: the slot's marginal cost on the device holding its expert (cost table): pair cost plus the
   expert's activation cost (and, offloaded and not resident, its fetch cost) shared among the tokens
   that use the expert in this batch; relative to the batch's mean slot cost (1 = an average slot). An
   expert used by one token costs that token its whole activation; one used by twenty, a twentieth.
   Score: importance / cost ** cost_exponent; with `per_expert`, every slot of an expert scores the sum
   of its users' importance over the sum of their costs, so an expert's users are pruned together (at
   batch 16 on one device a slot saves time only when its expert empties: its other slots' rows are
   computed anyway). An expert with one user scores as before.
4. Straggler-aware: the predicted load of each device (cost model); only devices above the target
   prune, in increasing order of score (step 3), while the score is below `theta` and the
   device's load, minus what it already pruned, is still above the target. Targets: "floor", the
   highest load any device is left with once all its slots scoring below theta are pruned (pruning
   always on the device bounding the layer, as far as theta allows); "next", the next-heaviest
   device's load; "mean", the mean load times 1 + slack; "none", no target: every device prunes all its
   slots scoring below theta (the straggler logic off, a baseline). On a single device every target
   but "none" is the floor (and "none" prunes the same slots).
5. Refill: a pruned slot whose expert still runs for other tokens saves nothing when the expert's rows
   are computed in whole tiles (the `loop` backend) and the slot fits in the tile's spare rows: such
   slots are restored, heaviest first. The predicted device times do not change; accuracy can only gain.
6. Compensation: see `compensation.py`.

`theta = 0` prunes nothing. Letters: N tokens, K top-k, E experts, S devices (expert shards).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from caee_jax import html
from caee_jax.caee.compensation import Compensation, compensate
from caee_jax.caee.cost_model import computed_rows, predict, row_tile
from caee_jax.caee.cost_table import CostTable
from caee_jax.caee.knobs import check_number, check_slots
from caee_jax.choice import Choice
from caee_jax.routing.ops import expert_load, rank_in_group, weight_rank


class Target(Choice):
    """How far the device bounding the layer is pruned (step 4 above)."""

    FLOOR = "floor"
    NEXT = "next"
    MEAN = "mean"
    NONE = "none"


TARGETS = Target.names()


@dataclasses.dataclass(frozen=True, kw_only=True)  # CAEEConfig(1.0) would read 1.0 as `enabled`
class CAEEConfig:
    """enabled: False leaves routing untouched (bit-identical to no pruning);
    theta: prune slots whose importance/cost score is below it (0: nothing); k_min: top slots per token
    never pruned; target, slack: how far a straggler is pruned ("floor": as far as theta allows, "next":
    down to the next-heaviest device, "mean": down to mean load x (1 + slack), "none": every device as far
    as theta allows, the straggler logic off); refill: restore pruned slots that fit in the rows their
    expert computes anyway (step 5 above); compensation: see
    `compensation.py`; expert_importance, layer_sensitivity: scale each slot's importance by its expert's
    calibrated output-norm factor, by its layer's calibrated sensitivity (`caee/importance.py`; the model
    needs an importance calibration set: `caee_jax.caee.importance.load_importance`); cost_exponent: the
    score divides importance by cost ** cost_exponent (1: by the cost; 0: cost ignored, a gate-mass rule
    that keeps the straggler target; between: a dear slot is pruned more readily, but less so); per_expert:
    score each expert as a whole (step 3 above): its users' summed importance over their summed cost."""

    enabled: bool = True
    theta: float = 0.8
    k_min: int = 1
    target: Target = Target.FLOOR
    slack: float = 0.0
    refill: bool = True
    compensation: Compensation = Compensation.NONE
    partial_alpha: float = 0.5
    expert_importance: bool = False
    layer_sensitivity: bool = False
    cost_exponent: float = 1.0
    per_expert: bool = False

    def _repr_html_(self) -> str:
        return html.fields_table(self, "CAEE rule", columns=1)

    def __post_init__(self):
        object.__setattr__(self, "target", Target.parse(self.target, "target"))
        object.__setattr__(self, "compensation", Compensation.parse(self.compensation, "compensation"))
        check_number("theta", self.theta, 0, math.inf)
        check_slots("k_min", self.k_min)
        check_number("slack", self.slack, 0, math.inf)
        check_number("partial_alpha", self.partial_alpha, 0, 1)
        check_number("cost_exponent", self.cost_exponent, 0, math.inf)


class Decision(NamedTuple):
    """keep_mask [N, K] bool: the pairs that run; weights [N, K]: their compensated combine weights (0 where
    pruned)."""

    keep_mask: jax.Array
    weights: jax.Array


def refill(
    prune: jax.Array, topk_ids: jax.Array, topk_weights: jax.Array, num_experts: int, tile: int, routed: jax.Array
) -> jax.Array:
    """prune [N, K] bool -> prune without the slots that fit, heaviest first, in the spare rows of their
    expert's computed tiles (rows an active expert computes anyway; none when tile = 1). routed [N, K]:
    the pairs of real tokens; the others neither fill rows nor are restored."""
    pairs = expert_load(topk_ids, routed & ~prune, num_experts).pairs
    spare = jnp.concatenate([computed_rows(pairs, tile) - pairs, jnp.zeros(1, pairs.dtype)])  # [E + 1]
    group = jnp.where(prune & routed, topk_ids, num_experts).reshape(-1)
    rank = rank_in_group(group, topk_weights.reshape(-1), num_experts)
    restore = (group < num_experts) & (rank < spare[group])
    return prune & ~restore.reshape(prune.shape)


class Explanation(NamedTuple):
    """Every quantity of one layer's CAEE decision (steps 1-5 above); per slot [N, K] unless noted.

    importance: share of the token's gate mass x K; cost_s: marginal predicted seconds on its device;
    cost: cost_s relative to the batch's mean slot; score: importance / cost ** cost_exponent (its
    expert's with `per_expert`); device: the slot's expert shard; protected: among the token's k_min
    heaviest (never pruned); candidate: not protected and score < theta; eligible: a candidate on a device
    above its target; pruned: pruned before refill; keep: what runs (pruned and not refilled).
    device_s [S]: predicted load unpruned (s); excess_s [S]: above target.
    """

    importance: jax.Array
    cost_s: jax.Array
    cost: jax.Array
    score: jax.Array
    device: jax.Array
    protected: jax.Array
    candidate: jax.Array
    eligible: jax.Array
    pruned: jax.Array
    keep: jax.Array
    device_s: jax.Array
    excess_s: jax.Array


def _excess(table: CostTable, config: CAEEConfig, topk_ids, kept_if_all_pruned, residency, load) -> jax.Array:
    """Each device's predicted load above its target [S] (s, >= 0; inf: prunes every candidate), S > 1."""
    if config.target is Target.FLOOR:
        floor = predict(table, topk_ids, kept_if_all_pruned, residency).device_s  # every candidate pruned
        # The device left heaviest prunes all its candidates; the others come down to its load.
        excess = jnp.where(floor >= jnp.max(floor), jnp.inf, load - jnp.max(floor))
    elif config.target is Target.NEXT:
        excess = load - jnp.sort(load)[-2]
    else:
        excess = load - jnp.mean(load) * (1 + config.slack)
    return jnp.maximum(excess, 0.0)


def _prune_in_score_order(num_devices: int, eligible, device, score, cost, excess) -> jax.Array:
    """Per device, the eligible slots [N, K] pruned in increasing score while the device's load is still
    above its target: cost [N, K] (s) saved so far below excess [S]."""
    flat_device = jnp.where(eligible, device, num_devices).reshape(-1)
    flat_score, flat_cost = score.reshape(-1), cost.reshape(-1)
    order = jnp.lexsort((flat_score, flat_device))
    sorted_device, sorted_cost = flat_device[order], jnp.where(flat_device < num_devices, flat_cost, 0)[order]
    cumulative = jnp.cumsum(sorted_cost)
    device_start = jnp.searchsorted(sorted_device, jnp.arange(num_devices + 1))
    saved_before = cumulative - sorted_cost - jnp.concatenate([jnp.zeros(1), cumulative])[device_start][sorted_device]
    excess_of = jnp.concatenate([excess, jnp.zeros(1)])[sorted_device]
    prune_sorted = (sorted_device < num_devices) & (saved_before < excess_of)
    return jnp.zeros(order.shape, bool).at[order].set(prune_sorted).reshape(eligible.shape)


def caee_prune(
    table: CostTable,
    config: CAEEConfig,
    topk_ids: jax.Array,
    topk_weights: jax.Array,
    residency: jax.Array | None = None,
    importance_scale: jax.Array | None = None,
    routed: jax.Array | None = None,
) -> Decision:
    """The CAEE decision for one MoE layer. topk_ids, topk_weights [N, K]; residency [E] int tier of each
    expert (0 resident, 1 host RAM, 2 disk; None: all resident): a miss costs its tier's fetch time;
    importance_scale [E] f32: each expert's calibrated importance factor (None: gate weight alone);
    routed [N, K] bool: the pairs of real tokens (None: all; a padded batch's dummy rows are not)."""
    keep = explain(table, config, topk_ids, topk_weights, residency, importance_scale, routed).keep
    return Decision(keep, compensate(topk_weights, keep, config.compensation, config.partial_alpha))


def explain(
    table: CostTable,
    config: CAEEConfig,
    topk_ids: jax.Array,
    topk_weights: jax.Array,
    residency: jax.Array | None = None,
    importance_scale: jax.Array | None = None,
    routed: jax.Array | None = None,
) -> Explanation:
    """`caee_prune`'s decision with its intermediate quantities (arguments as there). Pairs outside
    `routed` are neither loads, users nor candidates, and are never kept."""
    num_tokens, top_k = topk_ids.shape
    num_experts = len(table.placement)
    placement = table.placement_array()
    everything = jnp.ones(topk_ids.shape, bool) if routed is None else routed
    before = predict(table, topk_ids, everything, residency)

    # Importance and marginal cost of every slot.
    importance = top_k * topk_weights / jnp.maximum(topk_weights.sum(-1, keepdims=True), 1e-30)
    if importance_scale is not None:
        importance = importance * importance_scale[topk_ids]
    device = placement[topk_ids]  # [N, K]
    expert_cost = table.per_device("activation_s")[placement]  # [E]
    if residency is not None:
        expert_cost = expert_cost + table.per_device("fetch_s")[placement, residency]
    users = expert_load(topk_ids, everything, num_experts).pairs  # [E]
    cost = table.per_device("pair_s")[device] + expert_cost[topk_ids] / jnp.maximum(users[topk_ids], 1)
    mean_cost = jnp.mean(cost) if routed is None else jnp.sum(cost * routed) / jnp.maximum(jnp.sum(routed), 1)
    relative = jnp.where(mean_cost > 0, cost / mean_cost, 1.0)  # a table without slot costs: importance
    if config.per_expert:  # an expert's users share one score: their summed importance over their summed cost
        summed_importance, summed_cost = (
            jnp.zeros(num_experts).at[topk_ids].add(a * everything) for a in (importance, relative)
        )
        score = (summed_importance / summed_cost**config.cost_exponent)[topk_ids]
    else:
        score = importance / relative**config.cost_exponent

    # Straggler target: each device's excess over it, and the slots pruned to meet it.
    protected = weight_rank(topk_weights) < config.k_min
    candidates = ~protected & (score < config.theta) & everything
    load = before.device_s
    if config.target is Target.NONE or table.num_devices == 1:
        # No target, or one device (every target is then the floor it sets itself): every candidate goes.
        excess = jnp.full(load.shape, jnp.inf)
        eligible = pruned = candidates
    else:
        excess = _excess(table, config, topk_ids, everything & ~candidates, residency, load)
        eligible = candidates & (excess[device] > 0)
        pruned = _prune_in_score_order(table.num_devices, eligible, device, score, cost, excess)
    prune = pruned
    if config.refill:
        prune = refill(pruned, topk_ids, topk_weights, num_experts, row_tile(table, num_tokens), everything)
    return Explanation(
        importance, cost, cost / jnp.where(mean_cost > 0, mean_cost, 1.0), score, device, protected, candidates,
        eligible, pruned, everything & ~prune, load, excess,
    )  # fmt: skip
