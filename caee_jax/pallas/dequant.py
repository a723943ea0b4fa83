"""Weight tiles as the kernels multiply them: stored narrower than the compute dtype, widened or dequantised
in the kernel body, after the load (so only the stored bytes cross HBM).

fp8 tiles come with DeepSeek's block scales (`routing/storage.py`: one float32 per 128 x 128 block of the
[in, out] matrix). A kernel dequantises a weight tile one scale block at a time: its contraction rows in
chunks of at most 128 that never straddle a row block (`contraction_chunks`), and its columns within one
column block (`dispatch.check_blocks` refuses tiles that would straddle one). Each chunk's value is
float32(q) * scale rounded once to the compute dtype, the loop backend's `block_dequantize` bit for bit, so a
kernel differs from the float32 model holding the dequantised values only in its summation order.
"""

from __future__ import annotations

import jax.numpy as jnp

from caee_jax.routing.storage import BLOCK


def widen(tile, dtype, scale=None):
    """A weight tile in the compute dtype: float32(tile) * scale (fp8, scale a float32 scalar) or the tile
    widened (bf16 -> float32), rounded once to `dtype`."""
    if scale is None:
        return tile.astype(dtype)
    return (tile.astype(jnp.float32) * scale).astype(dtype)


def contraction_chunks(size: int, block: int = BLOCK[0]) -> tuple[int, int]:
    """(whole chunks of `block` rows, rows of the last, partial chunk) covering a contraction of `size`:
    each chunk lies in one scale row block."""
    return size // block, size % block


def column_block_fits(block: int, dim: int, scale_block: int = BLOCK[1]) -> bool:
    """Whether every tile of `block` columns (or contraction rows) of a `dim`-wide matrix lies inside one
    scale block: `block` divides the scale block, or one tile covers the whole dimension and the whole
    dimension fits one scale block."""
    return scale_block % block == 0 or (block == dim and dim <= scale_block)
