"""Multi-head Latent Attention (MLA), DeepSeek-V2/V3.

Einsum letters: B batch, T query, S key, D hidden, H heads, N nope head dim, P rope head dim,
C value head dim, R kv_lora_rank, Q q_lora_rank.

Keys and values are produced from a per-token latent [R] plus a shared roped key [P]; only that
latent is cached. Without a cache (full-sequence pass, prefill) keys/values are expanded per head;
with a cache (decode) the key up-projection is absorbed into the query and the value up-projection
applied after attention, so attention runs in the R-dimensional latent space.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from caee_jax.config import ModelConfig
from caee_jax.model.cache import write_latents
from caee_jax.model.layers import RMSNorm, param
from caee_jax.model.rope import apply_rope

# DeepSeek (and transformers) normalise the q and kv latents with a fixed eps, not rms_norm_eps.
LATENT_NORM_EPS = 1e-6


class MLAttention(nnx.Module):
    """MLA with or without the query low-rank projection (`q_lora_rank`)."""

    def __init__(self, config: ModelConfig, dtype, *, rngs: nnx.Rngs):
        self.config = config
        d, h = config.hidden_size, config.num_attention_heads
        n, p, c, r = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim, config.kv_lora_rank
        if config.q_lora_rank is None:
            self.wq = param(rngs, (d, h, n + p), ("embed", "heads", "qk_head"), dtype)
        else:
            q = config.q_lora_rank
            self.wq_a = param(rngs, (d, q), ("embed", "q_lora"), dtype)
            self.q_norm = RMSNorm(q, LATENT_NORM_EPS, dtype, rngs=rngs, axis="q_lora")
            self.wq_b = param(rngs, (q, h, n + p), ("q_lora", "heads", "qk_head"), dtype)
        self.wkv_a = param(rngs, (d, r + p), ("embed", "kv_lora"), dtype)
        self.kv_norm = RMSNorm(r, LATENT_NORM_EPS, dtype, rngs=rngs, axis="kv_lora")
        self.wk_b = param(rngs, (r, h, n), ("kv_lora", "heads", "qk_head"), dtype)
        self.wv_b = param(rngs, (r, h, c), ("kv_lora", "heads", "v_head"), dtype)
        self.wo = param(rngs, (h, c, d), ("heads", "v_head", "embed"), dtype)

    def _queries(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B, T, D] -> q_nope [B, T, H, N], roped q_pe [B, T, H, P]."""
        if self.config.q_lora_rank is None:
            q = jnp.einsum("btd,dhk->bthk", x, self.wq[...])
        else:
            q = jnp.einsum("btq,qhk->bthk", self.q_norm(x @ self.wq_a[...]), self.wq_b[...])
        n = self.config.qk_nope_head_dim
        return q[..., :n], apply_rope(q[..., n:], positions, self.config)

    def latents(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """x [B, T, D] -> cache entries [B, T, R+P]: normalised compressed KV, then the roped shared key."""
        r = self.config.kv_lora_rank
        kv = x @ self.wkv_a[...]
        compressed = self.kv_norm(kv[..., :r])
        k_pe = apply_rope(kv[..., r:], positions, self.config)
        return jnp.concatenate([compressed, k_pe], axis=-1)

    def __call__(
        self, x: jax.Array, positions: jax.Array, cache: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Attention for x [B, T, D] at positions [B, T] (int, per sequence).

        Without `cache`: causal attention among the T tokens; returns (out [B, T, D], latents [B, T, R+P]).
        With `cache` [B, S, R+P]: writes the T latents at their positions, attends to every slot at or
        before each query's position; returns (out [B, T, D], updated cache).
        """
        with jax.named_scope("mla"):
            q_nope, q_pe = self._queries(x, positions)
            new = self.latents(x, positions)
            if cache is None:
                out = self._expanded(q_nope, q_pe, new, positions)
                return out, new
            cache = write_latents(cache, new, positions)
            return self._absorbed(q_nope, q_pe, cache, positions), cache

    def _softmax(self, scores: jax.Array, visible: jax.Array, dtype) -> jax.Array:
        """scores [B, H, T, S] (float32), visible [B, T, S] -> probabilities in `dtype`."""
        scores = scores * self.config.softmax_scale
        scores = jnp.where(visible[:, None], scores, jnp.finfo(jnp.float32).min)
        return jax.nn.softmax(scores, axis=-1).astype(dtype)

    def _expanded(self, q_nope, q_pe, latents, positions) -> jax.Array:
        r = self.config.kv_lora_rank
        compressed, k_pe = latents[..., :r], latents[..., r:]
        k_nope = jnp.einsum("bsr,rhn->bshn", compressed, self.wk_b[...])
        values = jnp.einsum("bsr,rhc->bshc", compressed, self.wv_b[...])
        f32 = jnp.float32
        scores = jnp.einsum("bthn,bshn->bhts", q_nope, k_nope, preferred_element_type=f32)
        scores += jnp.einsum("bthp,bsp->bhts", q_pe, k_pe, preferred_element_type=f32)
        visible = positions[:, None, :] <= positions[:, :, None]
        probs = self._softmax(scores, visible, values.dtype)
        out = jnp.einsum("bhts,bshc->bthc", probs, values)
        return jnp.einsum("bthc,hcd->btd", out, self.wo[...])

    def _absorbed(self, q_nope, q_pe, cache, positions) -> jax.Array:
        r = self.config.kv_lora_rank
        compressed, k_pe = cache[..., :r], cache[..., r:]
        f32 = jnp.float32
        q_latent = jnp.einsum("bthn,rhn->bthr", q_nope, self.wk_b[...])
        scores = jnp.einsum("bthr,bsr->bhts", q_latent, compressed, preferred_element_type=f32)
        scores += jnp.einsum("bthp,bsp->bhts", q_pe, k_pe, preferred_element_type=f32)
        slots = jnp.arange(cache.shape[1])
        visible = slots[None, None, :] <= positions[:, :, None]
        probs = self._softmax(scores, visible, compressed.dtype)
        out_latent = jnp.einsum("bhts,bsr->bthr", probs, compressed)
        out = jnp.einsum("bthr,rhc->bthc", out_latent, self.wv_b[...])
        return jnp.einsum("bthc,hcd->btd", out, self.wo[...])
