"""Array operations on routed (token, expert) pairs, written once for every stage that needs them.

Pure jnp, jit-friendly (shapes static, contents data). Letters: N tokens, K top-k, E experts,
P = N*K pairs, G groups.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


def group_sizes(group: jax.Array, num_groups: int) -> jax.Array:
    """group int in [0, num_groups] (num_groups: the sentinel "no group") -> items per group [num_groups + 1]."""
    return jnp.bincount(group.reshape(-1), length=num_groups + 1)


def kept_pairs_per_expert(topk_ids: jax.Array, keep_mask: jax.Array, num_experts: int) -> jax.Array:
    """topk_ids, keep_mask [N, K] -> kept pairs per expert [E] int32 (pruned pairs go to the sentinel)."""
    return group_sizes(jnp.where(keep_mask, topk_ids, num_experts), num_experts)[:num_experts].astype(jnp.int32)


class ExpertLoad(NamedTuple):
    """pairs [E] int32: kept pairs per expert; active [E] bool: experts with at least one kept pair."""

    pairs: jax.Array
    active: jax.Array


def expert_load(topk_ids: jax.Array, keep_mask: jax.Array, num_experts: int) -> ExpertLoad:
    """topk_ids, keep_mask [N, K] -> kept pairs and activity per expert."""
    pairs = kept_pairs_per_expert(topk_ids, keep_mask, num_experts)
    return ExpertLoad(pairs, pairs > 0)


def expert_groups(topk_ids: jax.Array, keep_mask: jax.Array, num_experts: int):
    """Sorts kept pairs by expert.

    Returns (order [P]: pair index of each sorted row, counts [E]: kept pairs per expert,
    starts [E]: first sorted row of each expert). Pruned pairs sort last, past every expert.
    """
    order = jnp.argsort(jnp.where(keep_mask, topk_ids, num_experts).reshape(-1), stable=True)
    counts = kept_pairs_per_expert(topk_ids, keep_mask, num_experts)
    return order, counts, jnp.cumsum(counts) - counts


def rank_in_group(group: jax.Array, weight: jax.Array, num_groups: int) -> jax.Array:
    """group [P] int in [0, num_groups], weight [P] -> each item's rank within its group, heaviest first
    (capacity slots: an item fits when its rank is below the capacity)."""
    order = jnp.lexsort((-weight, group))
    counts = group_sizes(group, num_groups)
    first = jnp.cumsum(counts) - counts  # first sorted position of each group
    return jnp.zeros(group.shape, jnp.int32).at[order].set(jnp.arange(group.size) - first[group[order]])


def weight_rank(topk_weights: jax.Array) -> jax.Array:
    """[N, K] -> rank of each slot by gate weight within its token (0 = heaviest; ties: the earlier slot first).
    K x K comparisons per token rather than two sorts: cheaper for a top-k's few slots."""
    slot = jnp.arange(topk_weights.shape[-1])
    other, this = topk_weights[..., None, :], topk_weights[..., :, None]  # [N, K (this), K (other)]
    ahead = (other > this) | ((other == this) & (slot[None, :] < slot[:, None]))
    return ahead.sum(-1, dtype=jnp.int32)


def combine_matrix(topk_ids, topk_weights, keep_mask, num_experts: int) -> jax.Array:
    """[N, K] routing -> [N, E] combine weights (0 where a token does not use an expert)."""
    kept = jnp.where(keep_mask, topk_weights, 0).astype(jnp.float32)
    rows = jnp.arange(topk_ids.shape[0])[:, None]
    return jnp.zeros((topk_ids.shape[0], num_experts), jnp.float32).at[rows, topk_ids].add(kept)


def capacity_slots(pairs: int, groups: int, factor: float) -> int:
    """ceil(factor * mean pairs per group): the slots a capacity factor buys each group (expert or shard).
    Callers bound it as their layout needs."""
    return math.ceil(factor * pairs / groups)
