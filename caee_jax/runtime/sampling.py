"""Next-token choice from logits: greedy at temperature 0, else temperature + nucleus (top-p) sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
    """logits [B, V] f32; temperature, top_p: scalars (traced, so changing them never recompiles) -> ids [B] int32."""

    def nucleus(logits):
        scaled = logits / jnp.maximum(temperature, 1e-6)
        order = jnp.argsort(-scaled, axis=-1)
        sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        sorted_logits = jnp.where(mass_before < top_p, sorted_logits, -jnp.inf)  # the top token always stays
        choice = jax.random.categorical(key, sorted_logits, axis=-1)
        return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)

    def greedy(logits):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    # A real branch: greedy decoding never pays for sorting the vocabulary (~30 ms at [16, 8192] on CPU).
    return jax.lax.cond(temperature > 0, nucleus, greedy, logits)
