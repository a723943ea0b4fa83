"""The grouped kernels' row layout and work list: kept pairs sorted by expert, cut into row tiles.

Rows are the kept (token, expert) pairs sorted by expert (`expert_groups`), followed by unused rows up to
M = T * block_m, T = ceil(P / block_m) tiles of block_m rows, P = N*K pairs. Expert e owns the rows
[group_start[e], group_end[e]); groups are contiguous and not padded, so a tile can hold rows of several
experts. The kernels therefore iterate over *work items*, one per (tile, expert) overlap, ordered by expert
then tile: an active expert's items are consecutive, so its weight blocks stay put while it runs, and an
expert with no kept row has no item at all. At most W = T + min(E, P) - 1 items exist (each boundary
between two consecutive active groups adds at most one shared tile), which is the static grid size;
`num_items` of them are real. The others repeat the last real item (same tile, same expert, hence the same
block indices: the TPU pipeline issues no copy for them) and are skipped in the kernel body.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from caee_jax.routing.ops import expert_groups


class GroupLayout(NamedTuple):
    """Sorted-row layout and work list (int32 throughout).

    row_pair [M]: pair index (token * K + slot) of each sorted row; rows >= num_kept hold no pair.
    num_kept []: number of kept pairs (the rows in use).
    group_start, group_end [E]: each expert's row range (empty when start == end).
    item_tile, item_expert [W]: the tile and expert of each work item.
    num_items [1]: the real work items (a 1-element array so that it can be a scalar-prefetch operand).
    """

    row_pair: jax.Array
    num_kept: jax.Array
    group_start: jax.Array
    group_end: jax.Array
    item_tile: jax.Array
    item_expert: jax.Array
    num_items: jax.Array

    @property
    def work_list(self) -> tuple[jax.Array, ...]:
        """The kernels' metadata operands: item_tile, item_expert, group_start, group_end, num_items."""
        return self.item_tile, self.item_expert, self.group_start, self.group_end, self.num_items


def num_tiles(num_pairs: int, block_m: int) -> int:
    """T: row tiles covering every pair."""
    return -(-num_pairs // block_m)


def max_items(num_pairs: int, num_experts: int, block_m: int) -> int:
    """W: the most (tile, expert) overlaps any routing can produce."""
    return num_tiles(num_pairs, block_m) + min(num_experts, num_pairs) - 1


def group_layout(topk_ids: jax.Array, keep_mask: jax.Array, num_experts: int, block_m: int) -> GroupLayout:
    """topk_ids, keep_mask [N, K] -> the layout for row tiles of block_m rows."""
    num_pairs = topk_ids.size
    rows = num_tiles(num_pairs, block_m) * block_m
    order, counts, starts = expert_groups(topk_ids, keep_mask, num_experts)
    counts, starts = counts.astype(jnp.int32), starts.astype(jnp.int32)
    ends = starts + counts
    first_tile = starts // block_m
    items = jnp.where(counts > 0, (ends - 1) // block_m - first_tile + 1, 0)  # [E] tiles each expert touches
    items_end = jnp.cumsum(items)  # [E] inclusive
    num_items = items_end[-1]
    # Item w belongs to the first expert whose inclusive end exceeds it; items past the last repeat it.
    w = jnp.minimum(jnp.arange(max_items(num_pairs, num_experts, block_m)), jnp.maximum(num_items - 1, 0))
    expert = jnp.minimum(jnp.searchsorted(items_end, w, side="right"), num_experts - 1).astype(jnp.int32)
    tile = first_tile[expert] + w - (items_end[expert] - items[expert])
    row_pair = jnp.zeros(rows, jnp.int32).at[:num_pairs].set(order.astype(jnp.int32))
    return GroupLayout(
        row_pair=row_pair,
        num_kept=ends[-1],
        group_start=starts,
        group_end=ends,
        item_tile=tile.astype(jnp.int32),
        item_expert=expert,
        num_items=num_items.reshape(1).astype(jnp.int32),
    )
