"""The decide stage of the MoE: a pruning rule (CAEE or a peer rule) -> which pairs run, with what weight."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from caee_jax.caee.compensation import Compensation, compensate
from caee_jax.caee.cost_table import CostTable
from caee_jax.caee.peer_rules import PeerRule, PeerRuleName, peer_keep_mask
from caee_jax.caee.policy import CAEEConfig, Decision, caee_prune

Pruning = CAEEConfig | PeerRule


def decide(
    rule: Pruning | None,
    table: CostTable | None,
    topk_ids: jax.Array,
    topk_weights: jax.Array,
    num_experts: int,
    num_shards: int = 1,
    residency: jax.Array | None = None,
    importance_scale: jax.Array | None = None,
    routed: jax.Array | None = None,
    slot_ids: jax.Array | None = None,
    num_slots: int | None = None,
) -> Decision:
    """topk_ids, topk_weights [N, K] -> Decision (keep_mask [N, K] bool, combine weights [N, K]).

    No rule, or a disabled CAEEConfig, keeps every slot with its weight unchanged. CAEE needs the cost
    table of the mesh it runs on (`num_shards` expert shards). With `mean` compensation the weights are
    `none`'s; the combine stage adds the pruned slots' mean outputs (`uses_mean`). residency [E] int
    (offloaded experts: 0 resident, else the store's tier) prices CAEE's misses; peer rules ignore it.
    importance_scale [E] f32: CAEE's calibrated per-expert importance factor (`caee/importance.py`), or None.
    routed [N, K] bool: the pairs of real tokens (None: all); a padded batch's dummy rows never run and
    CAEE does not count them (the `capacity` peer rule's budget still counts N).
    slot_ids [N, K]: with replicated experts (`parallel/replicas.py`), the physical slot of each pair among
    `num_slots`. CAEE then works on slots: a slot's device, its users and its activation cost are what
    decide a straggler's load and a pair's price (a hot expert's replicas on two devices are two loads),
    so the table is moved onto the slots (`CostTable.over_slots`) and importance_scale comes per slot [P].
    Peer rules are rules on the router's weights and stay logical (`capacity` caps each logical expert).
    """
    with jax.named_scope("decide"):
        everything = jnp.ones(topk_ids.shape, bool) if routed is None else routed
        if not is_active(rule):
            return Decision(everything, topk_weights)
        if isinstance(rule, PeerRule):
            keep = peer_keep_mask(rule, topk_ids, topk_weights, num_experts) & everything
            return Decision(keep, compensate(topk_weights, keep, rule.compensation, rule.partial_alpha))
        if table is None:
            raise ValueError("CAEE needs a cost table: Execution(cost_table=...) (see launch/calibrate.py)")
        if table.signature.n_routed_experts != num_experts or table.num_devices != num_shards:
            raise ValueError(
                f"the cost table covers {table.signature.n_routed_experts} experts on {table.num_devices} device(s); "
                f"this layer has {num_experts} experts on {num_shards} expert shard(s)"
            )
        if slot_ids is not None:
            table, topk_ids = table.over_slots(num_slots), slot_ids
        elif len(table.placement) != num_experts:
            raise ValueError(f"the cost table places {len(table.placement)} expert slots; this layer has no replicas")
        return caee_prune(table, rule, topk_ids, topk_weights, residency, importance_scale, routed)


def uses_mean(rule: Pruning | None) -> bool:
    """True when the rule prunes and compensates with calibrated mean expert outputs (the combine stage adds them)."""
    return is_active(rule) and rule.compensation is Compensation.MEAN


def is_active(rule: Pruning | None) -> bool:
    """True when the rule can prune anything (not None, not a disabled CAEEConfig)."""
    return rule is not None and not (isinstance(rule, CAEEConfig) and not rule.enabled)


def ranks_across_batch(rule: Pruning | None) -> bool:
    """True when a token's keep mask depends on other tokens' routing (CAEE, the `capacity` peer rule);
    False for no rule and the per-token peer rules."""
    if isinstance(rule, PeerRule):
        return rule.name is PeerRuleName.CAPACITY
    return is_active(rule)
