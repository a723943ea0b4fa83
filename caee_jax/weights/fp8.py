"""DeepSeek's block-scaled FP8 weights: dequantisation exactly as the reference `weight_dequant`.

A released linear weight W [M, N] is stored as float8_e4m3fn together with `weight_scale_inv`
[ceil(M / bm), ceil(N / bn)] float32, one scale per bm x bn block (bm = bn = 128 in the release). The
reference computes float32(W[i, j]) * scale_inv[i // bm, j // bn] in float32 and rounds the product
once to the output dtype; blocks on the right and bottom edges may be partial and use their block's
scale like any other. XLA does the arithmetic here (several times faster than numpy's float8 casts);
the test suite checks it bit for bit against a torch transcription of the reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

FP8_DTYPE = np.dtype(ml_dtypes.float8_e4m3fn)
BLOCK = (128, 128)


def scale_shape(shape: tuple[int, ...], block: tuple[int, int] = BLOCK) -> tuple[int, int]:
    """The `weight_scale_inv` shape for an FP8 weight of `shape` [M, N]: [ceil(M / bm), ceil(N / bn)]."""
    (m, n), (bm, bn) = shape, block
    return -(-m // bm), -(-n // bn)


@functools.partial(jax.jit, static_argnames=("block", "dtype", "transpose"))
def _dequantize(weight: jax.Array, scale_inv: jax.Array, block: tuple[int, int], dtype, transpose: bool) -> jax.Array:
    m, n = weight.shape
    rows = jnp.repeat(scale_inv, block[0], axis=0, total_repeat_length=scale_inv.shape[0] * block[0])[:m]
    scale = jnp.repeat(rows, block[1], axis=1, total_repeat_length=scale_inv.shape[1] * block[1])[:, :n]
    out = (weight.astype(jnp.float32) * scale).astype(dtype)
    return out.T if transpose else out


def dequantize(
    weight: np.ndarray, scale_inv: np.ndarray, dtype=np.float32, block: tuple[int, int] = BLOCK, transpose: bool = False
) -> np.ndarray:
    """float8_e4m3fn [M, N] and its float scale_inv [ceil(M/bm), ceil(N/bn)] -> numpy [M, N] in `dtype`;
    transpose: [N, M] instead (HF's [out, in] -> the model's [in, out]), in the same pass."""
    if weight.dtype != FP8_DTYPE or weight.ndim != 2:
        raise ValueError(f"expected a 2-D float8_e4m3fn weight, got {weight.dtype} {weight.shape}")
    if scale_inv.shape != scale_shape(weight.shape, block):
        raise ValueError(
            f"scale_inv shape {scale_inv.shape} does not fit weight {weight.shape} with {block} blocks "
            f"(expected {scale_shape(weight.shape, block)})"
        )
    scale = np.asarray(scale_inv, dtype=np.float32)
    return np.asarray(_dequantize(weight, scale, tuple(block), np.dtype(dtype), transpose))
