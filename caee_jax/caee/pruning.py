"""The one entry point the MoE layer calls: a pruning rule (CAEE or a peer rule) -> keep mask + combine weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from caee_jax.caee.compensation import compensate
from caee_jax.caee.cost_table import CostTable
from caee_jax.caee.peer_rules import PeerRule, peer_keep_mask
from caee_jax.caee.policy import CAEEConfig, caee_prune

Pruning = CAEEConfig | PeerRule


def prune(
    rule: Pruning | None,
    table: CostTable | None,
    topk_ids: jax.Array,
    topk_weights: jax.Array,
    num_experts: int,
    num_shards: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """topk_ids, topk_weights [N, K] -> (keep_mask [N, K] bool, combine weights [N, K]).

    No rule, or a disabled CAEEConfig, keeps every slot with its weight unchanged. CAEE needs the cost
    table of the mesh it runs on (`num_shards` expert shards). With `mean` compensation the weights are
    `none`'s; the MoE adds the pruned slots' mean outputs (`uses_mean`).
    """
    everything = jnp.ones(topk_ids.shape, bool)
    if not _active(rule):
        return everything, topk_weights
    if isinstance(rule, PeerRule):
        keep = peer_keep_mask(rule, topk_ids, topk_weights, num_experts)
        return keep, compensate(topk_weights, keep, rule.compensation, rule.partial_alpha)
    if table is None:
        raise ValueError("CAEE needs a cost table: Execution(cost_table=...) (see launch/calibrate.py)")
    if len(table.placement) != num_experts or table.num_devices != num_shards:
        raise ValueError(
            f"the cost table covers {len(table.placement)} experts on {table.num_devices} device(s); this layer "
            f"has {num_experts} experts on {num_shards} expert shard(s)"
        )
    result = caee_prune(table, rule, topk_ids, topk_weights)
    return result.keep_mask, result.weights


def uses_mean(rule: Pruning | None) -> bool:
    """True when the rule prunes and compensates with calibrated mean expert outputs (the MoE adds them)."""
    return _active(rule) and rule.compensation == "mean"


def _active(rule: Pruning | None) -> bool:
    return rule is not None and not (isinstance(rule, CAEEConfig) and not rule.enabled)
