"""Reference expert execution: every expert on every token, combined with a masked weight matrix."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from caee_jax.routing.ops import combine_matrix


def run_dense(x, topk_ids, topk_weights, keep_mask, weights) -> jax.Array:
    """x [N, D], topk_ids/topk_weights/keep_mask [N, K], weights (gate, up [E, D, F]; down [E, F, D]) -> [N, D]."""
    combine = combine_matrix(topk_ids, topk_weights, keep_mask, weights.gate.shape[0])  # [N, E]
    hidden = jax.nn.silu(jnp.einsum("nd,edf->nef", x, weights.gate)) * jnp.einsum("nd,edf->nef", x, weights.up)
    outputs = jnp.einsum("nef,efd->ned", hidden, weights.down)
    return jnp.einsum("ne,ned->nd", combine, outputs.astype(jnp.float32)).astype(x.dtype)
