"""DeepSeek-V3 router: sigmoid scores, bias-corrected group-limited top-k (`noaux_tc`).

The `e_score_correction_bias` only decides which experts are chosen; the gate weights come from the
uncorrected sigmoid scores, optionally normalised over the top-k and scaled by routed_scaling_factor.
Letters: N tokens, D hidden, E experts, G groups, K top-k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from caee_jax.config import ModelConfig


def route(x: jax.Array, weight: jax.Array, bias: jax.Array, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """x [N, D], router weight [D, E], bias [E] -> (top-k expert ids [N, K] int32, gate weights [N, K] f32).

    Slots are ordered by descending bias-corrected score.
    """
    with jax.named_scope("route"):
        logits = jnp.einsum("nd,de->ne", x.astype(jnp.float32), weight.astype(jnp.float32))
        scores = jax.nn.sigmoid(logits)
        choice = scores + bias.astype(jnp.float32)
        if config.topk_group < config.n_group:
            grouped = choice.reshape(-1, config.n_group, config.experts_per_group)  # [N, G, E/G]
            group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [N, G]
            _, top_groups = jax.lax.top_k(group_scores, config.topk_group)  # [N, topk_group]
            # [N, G]: compared, not scattered, so that XLA keeps it split over the batch's devices
            group_mask = jnp.any(top_groups[:, :, None] == jnp.arange(config.n_group), axis=1)
            expert_mask = jnp.repeat(group_mask, config.experts_per_group, axis=-1)  # [N, E]
            choice = jnp.where(expert_mask, choice, -jnp.inf)
        _, topk_ids = jax.lax.top_k(choice, config.num_experts_per_tok)
        topk_weights = jnp.take_along_axis(scores, topk_ids, axis=-1)
        if config.norm_topk_prob:
            topk_weights = topk_weights / (topk_weights.sum(-1, keepdims=True) + 1e-20)
        return topk_ids.astype(jnp.int32), topk_weights * config.routed_scaling_factor
