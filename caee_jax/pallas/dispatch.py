"""`run_pallas`: the Pallas expert backend (sort kept pairs, grouped SwiGLU kernel, weighted scatter-add).

1. `group_layout` sorts kept pairs by expert and builds the work list; x rows are gathered into that order
   (rows holding no kept pair are zero).
2. The platform's grouped kernel (`tpu.py` for Mosaic, `gpu.py` for Triton) computes each row's expert
   output in float32, touching only experts that have kept rows. With no kept pair at all the kernel is
   not launched (a TPU pipeline would otherwise fetch the first item's blocks). Weights may be stored
   narrower than x: bf16 under float32 compute (widened in the kernel), or fp8 with DeepSeek's 128 x 128
   block scales (dequantised in the kernel, `dequant.py`); the stored bytes are what the kernel loads.
3. Each row is scaled by its pair's combine weight and scatter-added to its token in float32 (plain XLA,
   outside the kernel); rows past the kept total are masked out before the sum, never read as data.
Letters: N tokens, D hidden, E experts, F expert width, K top-k, P = N*K pairs, M sorted rows.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

from caee_jax.pallas import gpu, tpu
from caee_jax.pallas.dequant import column_block_fits
from caee_jax.pallas.layout import group_layout
from caee_jax.routing.backend import ExpertWeights
from caee_jax.routing.storage import BLOCK, FP8_DTYPE, scale_shape

Platform = Literal["tpu", "gpu"]
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
# Column block candidates, largest first; the full dimension is the fallback. TPU blocks are lane-dense
# (multiples of 128) and sized for VMEM at DeepSeek-V3 widths (D=7168, F=2048, see tpu.vmem_bytes);
# Triton tiles are powers of two and small enough for registers/shared memory.
COLUMN_BLOCKS = {"tpu": (256, 128), "gpu": (64, 32, 16)}
MAX_BLOCK_M = {"tpu": 128, "gpu": 64}
KERNELS = {"tpu": tpu.grouped_swiglu, "gpu": gpu.grouped_swiglu}


def min_block_m(platform: Platform, dtype) -> int:
    """Fewest rows per tile: a TPU vreg's sublanes (8 for 32-bit, 16 for packed 16-bit), Triton's dot minimum 16."""
    return 32 // jnp.dtype(dtype).itemsize if platform == "tpu" else 16


def default_platform() -> Platform:
    """The kernel variant for the default JAX backend ("tpu" for CPU interpret mode)."""
    return "gpu" if jax.default_backend() in ("gpu", "cuda", "rocm") else "tpu"


def default_blocks(
    platform: Platform, num_pairs: int, num_experts: int, d: int, f: int, dtype, scaled: bool = False
) -> tuple[int, ...]:
    """(block_m, block_f, block_d) for a platform.

    block_m: a power of two at least the mean pairs per expert (decode gives about one), clamped to
    [min_block_m, MAX_BLOCK_M]: rows past an expert's pairs in its last tile are computed and discarded.
    block_f, block_d: the first candidate dividing F (resp. D), else the whole dimension. scaled (fp8
    weights): only candidates inside one 128-column scale block, else the whole dimension if it fits one
    (F, D <= 128), else the largest power of two dividing both it and 128 (interpret mode only on TPU:
    `check_blocks` says so).
    """
    mean = max(1, -(-num_pairs // num_experts))
    block_m = min(MAX_BLOCK_M[platform], max(min_block_m(platform, dtype), 1 << (mean - 1).bit_length()))
    columns = COLUMN_BLOCKS[platform]
    if not scaled:
        return block_m, next((c for c in columns if f % c == 0), f), next((c for c in columns if d % c == 0), d)

    def fitting(dim: int) -> int:
        fallback = dim if dim <= BLOCK[1] else math.gcd(dim, BLOCK[1])
        return next((c for c in columns if dim % c == 0 and column_block_fits(c, dim)), fallback)

    return block_m, fitting(f), fitting(d)


def check_blocks(
    platform: Platform,
    interpret: bool,
    dtype,
    d: int,
    f: int,
    block_m: int,
    block_f: int,
    block_d: int,
    scaled: bool = False,
):
    """Raises ValueError for block sizes the kernel or (when compiling for hardware) the platform rejects.
    scaled: fp8 weights, whose tiles must each lie inside one 128 x 128 scale block."""
    if min(block_m, block_f, block_d) < 1:
        raise ValueError(f"block sizes must be positive, got block_m={block_m}, block_f={block_f}, block_d={block_d}")
    if f % block_f or d % block_d:
        raise ValueError(f"block_f={block_f} must divide F={f} and block_d={block_d} must divide D={d}")
    for name, block, dim in (("block_f", block_f, f), ("block_d", block_d, d)) if scaled else ():
        if not column_block_fits(block, dim):
            raise ValueError(
                f"fp8 weights: {name}={block} must divide the {BLOCK[1]}-wide scale blocks, or be the whole "
                f"dimension ({dim}) when it is at most {BLOCK[1]}: a tile must lie inside one scale block"
            )
    if interpret:
        return
    if platform == "tpu":
        sublanes = min_block_m(platform, dtype)
        if block_m % sublanes:
            raise ValueError(f"TPU: block_m={block_m} must be a multiple of {sublanes} for {jnp.dtype(dtype).name}")
        for name, block, dim in (("block_f", block_f, f), ("block_d", block_d, d)):
            if block % 128 and block != dim:
                raise ValueError(f"TPU: {name}={block} must be a multiple of 128 or the whole dimension ({dim})")
    else:
        for name, block in (("block_m", block_m), ("block_f", block_f), ("block_d", block_d)):
            if block < 16 or block & (block - 1):
                raise ValueError(f"GPU (Triton): {name}={block} must be a power of two >= 16")


def check_inputs(x, topk_ids, topk_weights, keep_mask, weights, stacked: bool, scales=None):
    """Raises ValueError for dtypes or shapes the kernel does not take. Weights are in x's dtype, bfloat16
    under float32 x, or float8_e4m3fn with `scales` of `scale_shape` (float32)."""
    if x.ndim != 2:
        raise ValueError(f"x must be [N, D], got shape {x.shape}")
    if x.dtype not in DTYPES:
        raise ValueError(f"x must be float32 or bfloat16, got {x.dtype}")
    n, d = x.shape
    if topk_ids.ndim != 2 or topk_ids.shape[0] != n:
        raise ValueError(f"topk_ids must be [N={n}, K], got shape {topk_ids.shape}")
    for name, a in (("topk_weights", topk_weights), ("keep_mask", keep_mask)):
        if a.shape != topk_ids.shape:
            raise ValueError(f"{name} must have topk_ids' shape {topk_ids.shape}, got {a.shape}")
    if not jnp.issubdtype(topk_ids.dtype, jnp.integer):
        raise ValueError(f"topk_ids must be integer, got {topk_ids.dtype}")
    if keep_mask.dtype != jnp.bool_:
        raise ValueError(f"keep_mask must be bool, got {keep_mask.dtype}")
    lead = 2 if stacked else 1
    gate, up, down = weights
    expected = "[L, E, D, F]" if stacked else "[E, D, F]"
    if gate.ndim != lead + 2 or gate.shape[lead] != d:
        raise ValueError(f"gate must be {expected} with D={d}, got shape {gate.shape}")
    f = gate.shape[-1]
    if up.shape != gate.shape or down.shape != (*gate.shape[:lead], f, d):
        expected_down = (*gate.shape[:lead], f, d)
        raise ValueError(f"up must match gate {gate.shape} and down be {expected_down}: got {up.shape}, {down.shape}")
    narrower = {jnp.dtype(jnp.float32): (jnp.dtype(jnp.bfloat16),)}.get(x.dtype, ())
    for name, w in zip(ExpertWeights._fields, weights, strict=True):
        if w.dtype == FP8_DTYPE:
            if scales is None:
                raise ValueError(f"{name} is {w.dtype} without block scales ({name}_scale)")
        elif w.dtype != x.dtype and w.dtype not in narrower:
            raise ValueError(
                f"{name} dtype {w.dtype} differs from x dtype {x.dtype} (and is not fp8 or bf16 under f32)"
            )
    if scales is None:
        return
    for name, w, s in zip(ExpertWeights._fields, weights, scales, strict=True):
        if w.dtype != FP8_DTYPE:
            raise ValueError(f"{name} is {w.dtype} but comes with block scales ({name}_scale)")
        if tuple(s.shape) != scale_shape(w.shape) or s.dtype != jnp.float32:
            raise ValueError(
                f"{name}_scale: block scales {s.dtype}{list(s.shape)} for weights {list(w.shape)}; "
                f"need float32{list(scale_shape(w.shape))}"
            )


def run_pallas(
    x: jax.Array,
    topk_ids: jax.Array,
    topk_weights: jax.Array,
    keep_mask: jax.Array,
    weights,
    *,
    layer_index: jax.Array | None = None,
    scales=None,
    platform: Platform | None = None,
    interpret: bool | None = None,
    block_m: int | None = None,
    block_f: int | None = None,
    block_d: int | None = None,
) -> jax.Array:
    """x [N, D], topk_ids/topk_weights/keep_mask [N, K], weights (gate, up [E, D, F]; down [E, F, D]) -> [N, D].

    layer_index: int scalar; the weights then carry a leading layer axis and the kernel reads [layer, expert]
      blocks straight from the stack (no copy of the layer).
    scales: for float8_e4m3fn weights, their float32 block scales (`routing/storage.py`: gate, up
      [E, ceil(D/128), ceil(F/128)], down [E, ceil(F/128), ceil(D/128)], leading L with layer_index); the
      kernel loads the fp8 tiles and dequantises them. bf16 weights under float32 x are widened in the kernel.
    platform: kernel variant, "tpu" (Mosaic) or "gpu" (Triton); default from `jax.default_backend()`.
    interpret: run the kernel in Pallas interpret mode; default True on a CPU backend. A
      `pltpu.InterpretParams` selects the TPU interpreter (simulated HBM/VMEM copies).
    block_m, block_f, block_d: rows per tile, F and D columns per block (`default_blocks`).
    """
    platform = platform or default_platform()
    if platform not in KERNELS:
        raise ValueError(f"unknown Pallas platform {platform!r}: 'tpu' or 'gpu'")
    interpret = jax.default_backend() == "cpu" if interpret is None else interpret
    stacked = layer_index is not None
    check_inputs(x, topk_ids, topk_weights, keep_mask, weights, stacked, scales)
    n, d = x.shape
    k = topk_ids.shape[1]
    e, f = weights.gate.shape[-3], weights.gate.shape[-1]
    scaled = scales is not None
    defaults = default_blocks(platform, n * k, e, d, f, x.dtype, scaled)
    block_m, block_f, block_d = (b or default for b, default in zip((block_m, block_f, block_d), defaults, strict=True))
    check_blocks(platform, bool(interpret), x.dtype, d, f, block_m, block_f, block_d, scaled)

    gate, up, down = weights if stacked else (w[None] for w in weights)  # [L, E, ...]
    if scaled:
        scales = tuple(scales) if stacked else tuple(s[None] for s in scales)  # [L, E, ...]
    layer = jnp.asarray(layer_index if stacked else 0, jnp.int32).reshape(1)
    layout = group_layout(topk_ids, keep_mask, e, block_m)
    token = layout.row_pair // k  # [M]
    kept_row = jnp.arange(token.shape[0]) < layout.num_kept  # [M]
    xs = jnp.where(kept_row[:, None], x[token], 0).astype(x.dtype)

    blocks = dict(block_m=block_m, block_f=block_f, block_d=block_d, interpret=interpret, scales=scales)
    kernel = KERNELS[platform]
    out = jax.lax.cond(
        layout.num_items[0] > 0,
        lambda *operands: kernel(*operands, **blocks),
        lambda xs, *_: jnp.zeros(xs.shape, jnp.float32),
        xs,
        gate,
        up,
        down,
        layer,
        layout,
    )  # [M, D] float32
    row_weight = jnp.where(keep_mask, topk_weights, 0).reshape(-1)[layout.row_pair].astype(jnp.float32)
    contribution = jnp.where(kept_row[:, None], out * row_weight[:, None], 0.0)
    return jnp.zeros((n, d), jnp.float32).at[token].add(contribution).astype(x.dtype)
