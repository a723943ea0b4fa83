"""CPU expert execution whose cost follows the work: a while-loop over active experts and row tiles.

Kept (token, expert) pairs are sorted by expert. The outer loop visits only experts with at least one
kept pair (so a pruned or unused expert's weights are never read); the inner loop visits
ceil(pairs / tile_rows) row tiles of that expert. Trip counts are data, not shapes: a new routing or
keep mask never recompiles. Letters: N tokens, D hidden, F expert width, K top-k, P = N*K pairs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def default_tile_rows(num_pairs: int, num_experts: int) -> int:
    """Rows per tile: about twice the mean pairs per expert, a power of two in [8, 128]."""
    mean = max(1, (2 * num_pairs) // num_experts)
    return int(min(128, max(8, 1 << (mean - 1).bit_length())))


def expert_groups(topk_ids: jax.Array, keep_mask: jax.Array, num_experts: int):
    """Sorts kept pairs by expert.

    Returns (order [P]: pair index of each sorted row, counts [E]: kept pairs per expert,
    starts [E]: first sorted row of each expert). Pruned pairs sort last, past every expert.
    """
    flat = jnp.where(keep_mask, topk_ids, num_experts).reshape(-1)
    order = jnp.argsort(flat, stable=True)
    counts = jnp.bincount(flat, length=num_experts + 1)[:num_experts]
    starts = jnp.cumsum(counts) - counts
    return order, counts, starts


def run_loop(x, topk_ids, topk_weights, keep_mask, weights, tile_rows: int | None = None, layer=None) -> jax.Array:
    """x [N, D], topk_ids/topk_weights/keep_mask [N, K], weights (gate, up [E, D, F]; down [E, F, D]) -> [N, D].

    With `layer` (int scalar), weights carry a leading layer axis and experts are read as [layer, expert].
    """
    num_tokens, k = topk_ids.shape
    num_experts = weights.gate.shape[0 if layer is None else 1]

    num_pairs = num_tokens * k
    tile = tile_rows or default_tile_rows(num_pairs, num_experts)
    order, counts, starts = expert_groups(topk_ids, keep_mask, num_experts)
    token_of_row = order // k  # [P]
    weight_of_row = jnp.where(keep_mask, topk_weights, 0).reshape(-1)[order].astype(jnp.float32)  # [P]
    active = jnp.nonzero(counts > 0, size=num_experts, fill_value=0)[0]  # active experts first
    num_active = jnp.sum(counts > 0)
    tile_offsets = jnp.arange(tile)

    def one_expert(i, out):
        expert = active[i]
        start, count = starts[expert], counts[expert]
        where = expert if layer is None else (layer, expert)
        gate, up, down = (w[where] for w in weights)

        def one_tile(j, out):
            rows = start + j * tile + tile_offsets
            valid = rows < start + count
            rows = jnp.minimum(rows, num_pairs - 1)
            tokens = token_of_row[rows]
            xs = x[tokens]  # [tile, D]
            hidden = jax.nn.silu(xs @ gate) * (xs @ up)
            scale = jnp.where(valid, weight_of_row[rows], 0.0)
            return out.at[tokens].add((hidden @ down).astype(jnp.float32) * scale[:, None])

        return jax.lax.fori_loop(0, (count + tile - 1) // tile, one_tile, out)

    out = jax.lax.fori_loop(0, num_active, one_expert, jnp.zeros(x.shape, jnp.float32))
    return out.astype(x.dtype)


def rank_in_group(group: jax.Array, weight: jax.Array, num_groups: int) -> jax.Array:
    """group [P] int in [0, num_groups], weight [P] -> each item's rank within its group, heaviest first
    (capacity slots: an item fits when its rank is below the capacity)."""
    order = jnp.lexsort((-weight, group))
    counts = jnp.bincount(group, length=num_groups + 1)
    first = jnp.cumsum(counts) - counts  # first sorted position of each group
    return jnp.zeros(group.shape, jnp.int32).at[order].set(jnp.arange(group.size) - first[group[order]])
