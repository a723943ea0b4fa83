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
    table of the mesh it runs on (`num_shards` expert shards).
    """
    everything = jnp.ones(topk_ids.shape, bool)
    if rule is None or (isinstance(rule, CAEEConfig) and not rule.enabled):
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
    if rule.compensation == "mean":
        raise ValueError("compensation 'mean' needs calibrated per-expert mean outputs, which the model lacks yet")
    result = caee_prune(table, rule, topk_ids, topk_weights)
    return result.keep_mask, result.weights
