"""MLA's compressed KV cache: per token per layer only the latent (kv_lora_rank + qk_rope_head_dim values).

Per-head keys and values are never cached; decode attends in the latent space (absorbed attention).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from caee_jax.config import ModelConfig


class LatentCache(NamedTuple):
    """Latents of the dense-MLP layers [L_dense, B, S, R+P] and of the MoE layers [L_moe, B, S, R+P].

    Slot s of sequence b holds the latent of the token at position s (normalised compressed KV, then
    the roped shared key).
    """

    dense: jax.Array
    moe: jax.Array

    @classmethod
    def zeros(cls, config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> LatentCache:
        def make(layers: int) -> jax.Array:
            return jnp.zeros((layers, batch, max_len, config.latent_dim), dtype)

        return cls(make(config.num_dense_layers), make(config.num_moe_layers))

    @property
    def max_len(self) -> int:
        return self.moe.shape[2]

    @property
    def nbytes(self) -> int:
        return self.dense.nbytes + self.moe.nbytes


def write_latents(cache: jax.Array, latents: jax.Array, positions: jax.Array) -> jax.Array:
    """Writes latents [B, T, C] into one layer's cache [B, S, C] at slots positions [B, T].

    One scatter per sequence (a batched scatter): XLA partitions it along the batch, so a cache split
    over devices is written in place (a scatter indexed by row ids made it all-gather every write)."""

    def write(rows, new, slots):  # [S, C], [T, C], [T]
        return rows.at[slots].set(new, mode="drop")

    return jax.vmap(write)(cache, latents.astype(cache.dtype), positions)
