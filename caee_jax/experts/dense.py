"""Reference expert execution: every expert on every token, combined with a masked weight matrix."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def combine_matrix(topk_ids, topk_weights, keep_mask, num_experts: int) -> jax.Array:
    """[N, K] routing -> [N, E] combine weights (0 where a token does not use an expert)."""
    kept = jnp.where(keep_mask, topk_weights, 0).astype(jnp.float32)
    rows = jnp.arange(topk_ids.shape[0])[:, None]
    return jnp.zeros((topk_ids.shape[0], num_experts), jnp.float32).at[rows, topk_ids].add(kept)


def run_dense(x, topk_ids, topk_weights, keep_mask, weights) -> jax.Array:
    """x [N, D], topk_ids/topk_weights/keep_mask [N, K], weights (gate, up [E, D, F]; down [E, F, D]) -> [N, D]."""
    combine = combine_matrix(topk_ids, topk_weights, keep_mask, weights.gate.shape[0])  # [N, E]
    hidden = jax.nn.silu(jnp.einsum("nd,edf->nef", x, weights.gate)) * jnp.einsum("nd,edf->nef", x, weights.up)
    outputs = jnp.einsum("nef,efd->ned", hidden, weights.down)
    return jnp.einsum("ne,ned->nd", combine, outputs.astype(jnp.float32)).astype(x.dtype)
