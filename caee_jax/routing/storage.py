"""How routed-expert weights are stored, separately from the dtype the model computes in.

f32   float32, as computed.
bf16  bfloat16; each active expert's weights are widened to the compute dtype when the loop reads them.
fp8   float8_e4m3fn plus one float32 scale per 128 x 128 block of each [in, out] matrix (DeepSeek's
      release format, `weight_scale_inv`): value = float32(q) * scale, rounded once to the compute dtype.

`block_quantize` makes the fp8 form of any float weights the way DeepSeek quantises (per block:
scale = amax / 448, q = round-to-nearest(w / scale) in e4m3), `block_dequantize` undoes it inside jit
on whatever leading axes the weights carry. Letters: M, N a matrix's rows and columns, bm, bn the block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from caee_jax.choice import Choice

FP8_DTYPE = np.dtype(ml_dtypes.float8_e4m3fn)
FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448
BLOCK = (128, 128)


class Storage(Choice):
    F32 = "f32"
    BF16 = "bf16"
    FP8 = "fp8"

    @property
    def dtype(self) -> np.dtype:
        """The dtype the weights themselves are held in."""
        return {Storage.F32: np.dtype(np.float32), Storage.BF16: np.dtype(jnp.bfloat16)}.get(self, FP8_DTYPE)

    @classmethod
    def of(cls, weights, dtype) -> Storage:
        """The storage `weights` names (a Storage or its name), or None: the storage whose dtype is `dtype`
        (float32 -> f32, bfloat16 -> bf16, float8_e4m3fn -> fp8), the experts held as every parameter."""
        if weights is not None:
            return cls.parse(weights, "weights")
        held = next((storage for storage in cls if storage.dtype == np.dtype(dtype)), None)
        if held is None:
            raise ValueError(f"experts held in {np.dtype(dtype).name}: no storage of {cls.names()} is that dtype")
        return held

    @property
    def scaled(self) -> bool:
        """Whether the weights come with block scales."""
        return self is Storage.FP8


def scale_shape(shape: tuple[int, ...], block: tuple[int, int] = BLOCK) -> tuple[int, ...]:
    """The block-scale shape of weights [..., M, N]: [..., ceil(M / bm), ceil(N / bn)]."""
    *lead, m, n = shape
    return (*lead, -(-m // block[0]), -(-n // block[1]))


def _blocked(a: jax.Array, block: tuple[int, int]) -> jax.Array:
    """[..., M, N] -> [..., Mb, bm, Nb, bn], zero-padded to whole blocks."""
    *lead, m, n = a.shape
    mb, nb = scale_shape(a.shape, block)[-2:]
    a = jnp.pad(a, [(0, 0)] * len(lead) + [(0, mb * block[0] - m), (0, nb * block[1] - n)])
    return a.reshape(*lead, mb, block[0], nb, block[1])


def block_quantize(weight, block: tuple[int, int] = BLOCK) -> tuple[jax.Array, jax.Array]:
    """float weights [..., M, N] -> (float8_e4m3fn [..., M, N], float32 scales [..., Mb, Nb]).

    Per block: scale = amax(|w|) / 448 (1 for an all-zero block), q = w / scale rounded to nearest e4m3,
    so the largest magnitude of each block maps to e4m3's largest finite value. The scales are what the
    release calls `weight_scale_inv`: dequantised = float32(q) * scale. Both divisions are IEEE float32
    divisions, as in DeepSeek's torch code (the scales are divided on the host: XLA:CPU turns a division
    by a constant into a multiplication by its rounded reciprocal).
    """
    amax = np.asarray(_block_amax(jnp.asarray(weight), block))
    scale = np.where(amax > 0, amax / np.float32(FP8_MAX), np.float32(1)).astype(np.float32)
    return _divide_blocks(jnp.asarray(weight), jnp.asarray(scale), block), jnp.asarray(scale)


@functools.partial(jax.jit, static_argnames="block")
def _block_amax(weight: jax.Array, block: tuple[int, int]) -> jax.Array:
    return jnp.max(jnp.abs(_blocked(weight.astype(jnp.float32), block)), axis=(-3, -1))


@functools.partial(jax.jit, static_argnames="block")
def _divide_blocks(weight: jax.Array, scale: jax.Array, block: tuple[int, int]) -> jax.Array:
    return (weight.astype(jnp.float32) / _expand(scale, weight.shape[-2:], block)).astype(FP8_DTYPE)


def block_dequantize(weight: jax.Array, scale: jax.Array, dtype, block: tuple[int, int] = BLOCK) -> jax.Array:
    """float8_e4m3fn [..., M, N] and float32 scales [..., Mb, Nb] -> [..., M, N] in `dtype`: each element
    float32(q) * its block's scale, rounded once to `dtype` (the release's `weight_dequant`), bit for bit.

    XLA:CPU widens float8 in software; here q's bits are moved into a float16 whose value is q / 256
    (e4m3 and float16 share the exponent field's meaning up to their biases, 7 and 15, subnormals
    included), which the CPU widens to float32 in hardware; the 256 is folded into the scale (a power
    of two: the product is unchanged). e4m3fn's NaN codes stay NaN. The scales reach their elements by
    broadcast, not by a gather.
    """
    bits = jax.lax.bitcast_convert_type(weight, jnp.uint8).astype(jnp.uint16)
    half = jax.lax.bitcast_convert_type(((bits & 0x80) << 8) | ((bits & 0x7F) << 7), jnp.float16)
    value = jnp.where(bits & 0x7F == 0x7F, jnp.nan, half.astype(jnp.float32))  # e4m3fn's NaN
    return (value * _expand(scale * 256, weight.shape[-2:], block)).astype(dtype)


def _expand(scale: jax.Array, shape: tuple[int, int], block: tuple[int, int]) -> jax.Array:
    """Block scales [..., Mb, Nb] -> one per element [..., M, N]."""
    *lead, mb, nb = scale.shape
    full = jnp.broadcast_to(scale[..., :, None, :, None], (*lead, mb, block[0], nb, block[1]))
    return full.reshape(*lead, mb * block[0], nb * block[1])[..., : shape[0], : shape[1]]


def check_scales(name: str, weight_shape: tuple[int, ...], scale, block: tuple[int, int] = BLOCK) -> None:
    """ValueError naming `name` unless `scale` (numpy or jax, concrete) has weight_shape's block-scale shape
    and holds only finite, positive float32 values."""
    expected = scale_shape(tuple(weight_shape), block)
    if tuple(scale.shape) != expected:
        raise ValueError(
            f"{name}: block scales of shape {tuple(scale.shape)} for weights {tuple(weight_shape)}; "
            f"{block[0]}x{block[1]} blocks need {expected}"
        )
    values = np.asarray(scale, np.float32)
    bad = ~(np.isfinite(values) & (values > 0))
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{name}: {int(bad.sum())} block scale(s) not finite and positive (first {values[where]} at {where})"
        )
