"""CPU expert execution whose cost follows the work: a while-loop over active experts and row tiles.

Kept (token, expert) pairs are sorted by expert. The outer loop visits only experts with at least one
kept pair (so a pruned or unused expert's weights are never read); the inner loop visits
ceil(pairs / tile_rows) row tiles of that expert. Trip counts are data, not shapes: a new routing or
keep mask never recompiles. Weights stored narrower than the compute dtype (`routing/storage.py`) are
widened, or dequantised from fp8 with their block scales, one active expert at a time inside the loop:
nothing converts a whole stack. Letters: N tokens, D hidden, F expert width, K top-k, P = N*K pairs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from caee_jax.routing.backend import ExpertWeights, default_tile_rows
from caee_jax.routing.ops import expert_groups
from caee_jax.routing.storage import block_dequantize


def run_loop(
    x, topk_ids, topk_weights, keep_mask, weights, tile_rows: int | None = None, layer_index=None, scales=None
):
    """x [N, D], topk_ids/topk_weights/keep_mask [N, K], weights (gate, up [E, D, F]; down [E, F, D]) -> [N, D].

    With `layer_index` (int scalar), weights carry a leading layer axis and experts are read as [layer, expert].
    scales: the fp8 weights' block scales (ExpertWeights of [E, ceil(D/128), ceil(F/128)] ...), else None.
    """
    num_experts = weights.gate.shape[0 if layer_index is None else 1]

    def read_expert(expert, state):
        where = expert if layer_index is None else (layer_index, expert)
        if scales is None:
            return ExpertWeights(*(w[where].astype(x.dtype) for w in weights)), state
        pairs = zip(weights, scales, strict=True)
        return ExpertWeights(*(block_dequantize(w[where], s[where], x.dtype) for w, s in pairs)), state

    out, _ = loop_over_experts(x, topk_ids, topk_weights, keep_mask, num_experts, read_expert, None, tile_rows)
    return out


def loop_over_experts(x, topk_ids, topk_weights, keep_mask, num_experts: int, read_expert, state, tile_rows=None):
    """The loop itself, with where an expert's weights come from left to the caller.

    read_expert(expert, state) -> (ExpertWeights of that expert: gate, up [D, F], down [F, D], state) is
    called once per active expert, in increasing expert id; `state` (any pytree, e.g. a device expert cache)
    is threaded through the loop. Returns (y [N, D] in x's dtype, final state).
    """
    num_tokens, k = topk_ids.shape
    num_pairs = num_tokens * k
    tile = tile_rows or default_tile_rows(num_pairs, num_experts)
    order, counts, starts = expert_groups(topk_ids, keep_mask, num_experts)
    token_of_row = order // k  # [P]
    weight_of_row = jnp.where(keep_mask, topk_weights, 0).reshape(-1)[order].astype(jnp.float32)  # [P]
    active = jnp.nonzero(counts > 0, size=num_experts, fill_value=0)[0]  # active experts first
    num_active = jnp.sum(counts > 0)
    tile_offsets = jnp.arange(tile)

    def one_expert(i, carry):
        out, state = carry
        expert = active[i]
        start, count = starts[expert], counts[expert]
        (gate, up, down), state = read_expert(expert, state)

        def one_tile(j, out):
            rows = start + j * tile + tile_offsets
            valid = rows < start + count
            rows = jnp.minimum(rows, num_pairs - 1)
            tokens = token_of_row[rows]
            xs = x[tokens]  # [tile, D]
            hidden = jax.nn.silu(xs @ gate) * (xs @ up)
            scale = jnp.where(valid, weight_of_row[rows], 0.0)
            return out.at[tokens].add((hidden @ down).astype(jnp.float32) * scale[:, None])

        return jax.lax.fori_loop(0, (count + tile - 1) // tile, one_tile, out), state

    out, state = jax.lax.fori_loop(0, num_active, one_expert, (jnp.zeros(x.shape, jnp.float32), state))
    return out.astype(x.dtype), state
