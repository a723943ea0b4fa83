"""Fixed-capacity expert execution: each expert takes at most `capacity` of its routed tokens.

Static shapes throughout ([E, C, D] batched matmuls), so it differentiates and vectorises well: the
training path. When more than `capacity` tokens pick an expert, the ones with the lowest gate weight
are dropped. Letters: N tokens, D hidden, E experts, F width, K top-k, C capacity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from caee_jax.routing.ops import capacity_slots, combine_matrix


def capacity_for(num_tokens: int, top_k: int, num_experts: int, factor: float) -> int:
    """ceil(factor * mean pairs per expert), at least 1 and at most the token count."""
    return max(1, min(num_tokens, capacity_slots(num_tokens * top_k, num_experts, factor)))


def run_capacity(x, topk_ids, topk_weights, keep_mask, weights, capacity: int) -> jax.Array:
    """x [N, D], routing [N, K], weights (gate, up [E, D, F]; down [E, F, D]) -> [N, D]."""
    num_experts = weights.gate.shape[0]
    combine = combine_matrix(topk_ids, topk_weights, keep_mask, num_experts)  # [N, E]
    # Each expert keeps its `capacity` highest-weight tokens; unused slots get weight 0.
    slot_weights, slot_tokens = jax.lax.top_k(combine.T, capacity)  # [E, C]
    xs = x[slot_tokens]  # [E, C, D]
    hidden = jax.nn.silu(jnp.einsum("ecd,edf->ecf", xs, weights.gate)) * jnp.einsum("ecd,edf->ecf", xs, weights.up)
    out = jnp.einsum("ecf,efd->ecd", hidden, weights.down).astype(jnp.float32) * slot_weights[..., None]
    y = jnp.zeros(x.shape, jnp.float32).at[slot_tokens.reshape(-1)].add(out.reshape(-1, x.shape[-1]))
    return y.astype(x.dtype)
