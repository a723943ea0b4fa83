"""Where a pruned slot's gate weight goes: only to experts that run anyway for that token (no data moves).

Modes, for one token with gate weights w over its top-k slots, kept set S and pruned set P:
  none     w_j for j in S; the pruned weight is lost.
  renorm   w_j * sum(w) / sum_S(w): the token's routed mass is kept whole.
  partial  w_j * sum(w) / (sum_S(w) + alpha * sum_P(w)): between the two (alpha = 1: none's mass,
           alpha = 0: renorm), a decoupled denominator.
  mean     w_j for j in S, plus sum_P w_j * mean_output[e_j]: a calibrated per-expert mean output
           vector stands in for each pruned expert (a table lookup, no weight read). `compensate` gives
           the weights (those of `none`); the MoE, which holds the vectors (`model/moe.py`,
           `caee/expert_means.py`), adds `mean_outputs`.
w is the router's gate weight as the kept slots use it (routed_scaling_factor included).
A token with every slot pruned keeps nothing (never happens with k_min >= 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from caee_jax.choice import Choice
from caee_jax.routing.ops import combine_matrix


class Compensation(Choice):
    NONE = "none"
    RENORM = "renorm"
    PARTIAL = "partial"
    MEAN = "mean"


COMPENSATIONS = Compensation.names()


def compensate(topk_weights: jax.Array, keep_mask: jax.Array, mode: str, alpha: float = 0.5) -> jax.Array:
    """topk_weights [N, K], keep_mask [N, K] bool -> combine weights [N, K] (0 on pruned slots)."""
    mode = Compensation.parse(mode, "compensation")
    kept = jnp.where(keep_mask, topk_weights, 0.0)
    if mode in (Compensation.NONE, Compensation.MEAN):
        return kept
    total = topk_weights.sum(-1, keepdims=True)
    kept_mass = kept.sum(-1, keepdims=True)
    denominator = kept_mass if mode is Compensation.RENORM else kept_mass + alpha * (total - kept_mass)
    scale = jnp.where(denominator > 0, total / jnp.maximum(denominator, 1e-30), 0.0)
    # A token that lost nothing keeps its weights exactly (no rounding from total / kept_mass).
    return kept * jnp.where((~keep_mask).any(-1, keepdims=True), scale, 1.0)


def mean_outputs(means: jax.Array, topk_ids: jax.Array, topk_weights: jax.Array, keep_mask: jax.Array) -> jax.Array:
    """means [E, D], routing [N, K] -> [N, D] f32: sum over each token's pruned slots j of w_j * means[e_j].

    One [N, E] x [E, D] matmul (N*E*D multiply-adds, under 1% of R1's expert work per token) rather than
    gathering an [N, K, D] block of vectors.
    """
    with jax.named_scope("mean_compensation"):
        pruned = combine_matrix(topk_ids, topk_weights, ~keep_mask, means.shape[0])  # [N, E]
        return jnp.einsum("ne,ed->nd", pruned, means.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
