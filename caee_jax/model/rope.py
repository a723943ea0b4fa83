"""Rotary position embedding with YaRN context extension, in HF DeepseekV3's layout.

DeepSeek's checkpoints store the rotary dims as interleaved pairs (x0, x1), (x2, x3), ...; with
`rope_interleave` (the default) each pair is rotated by one frequency and the result is written
de-interleaved (evens then odds), exactly as transformers does. Queries and keys share the layout,
so attention scores are the same as the interleaved form.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from caee_jax.config import ModelConfig, yarn_mscale


def inverse_frequencies(config: ModelConfig) -> tuple[np.ndarray, float]:
    """Per-pair angular frequencies [P/2] (radians per position) and the cos/sin magnitude factor."""
    dim = config.qk_rope_head_dim
    base = config.rope_theta
    exponents = np.arange(0, dim, 2, dtype=np.float32) / dim
    # The power in float64, rounded once to float32, reproduces torch's float32 table exactly; a float32
    # power is off by one ulp in a few entries, which at position 1e5 is a 1e-2 angle error.
    pos_freqs = np.power(float(base), exponents.astype(np.float64)).astype(np.float32)
    inv_freq = (1.0 / pos_freqs).astype(np.float32)
    yarn = config.rope_scaling
    if yarn is None:
        return inv_freq, 1.0

    if yarn.attention_factor is not None:
        attention_factor = yarn.attention_factor
    elif yarn.mscale and yarn.mscale_all_dim:
        attention_factor = yarn_mscale(yarn.factor, yarn.mscale) / yarn_mscale(yarn.factor, yarn.mscale_all_dim)
    else:
        attention_factor = yarn_mscale(yarn.factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(yarn.beta_fast), correction_dim(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation_weight = 1 - ramp
    interpolated = (1.0 / (yarn.factor * pos_freqs)).astype(np.float32)
    inv_freq = interpolated * (1 - extrapolation_weight) + inv_freq * extrapolation_weight
    return inv_freq.astype(np.float32), float(attention_factor)


def apply_rope(x: jax.Array, positions: jax.Array, config: ModelConfig) -> jax.Array:
    """Rotates x [B, T, ..., P] by the angles of positions [B, T]; returns the same shape and dtype."""
    inv_freq, magnitude = inverse_frequencies(config)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, P/2]
    angles = angles.reshape(angles.shape[:2] + (1,) * (x.ndim - 3) + angles.shape[-1:])
    cos = (jnp.cos(angles) * magnitude).astype(x.dtype)
    sin = (jnp.sin(angles) * magnitude).astype(x.dtype)
    if config.rope_interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
