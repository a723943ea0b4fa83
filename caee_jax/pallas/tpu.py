"""TPU (Mosaic) grouped SwiGLU: scalar-prefetched work list, BlockSpec pipelining, weight blocks per expert.

Two pallas_calls, both with grid (column blocks, work items) and the work list in SMEM (scalar prefetch):

  1. h[rows, F]  = silu(xs @ gate[layer, e]) * (xs @ up[layer, e])   grid (F / block_f, W)
  2. out[rows, D] = h @ down[layer, e]                                 grid (D / block_d, W)

For work item w (tile t, expert e) the index maps pick x/h rows of tile t and the weight block
[layer, e, :, column block]. Items are ordered by expert, so an expert's consecutive items keep the same
weight block index and Mosaic copies the block from HBM once per (active expert, column block); padded
items repeat the last real item's indices (no copy) and `pl.when` skips their body; an expert without kept
rows has no item, so its blocks are never copied. Within a tile only the expert's own rows are written
(the block is zeroed on the tile's first item), so rows of several experts can share a tile.

Weights stored narrower than xs (bf16 under float32 compute) are widened after the copy. fp8 weights come
with their block scales: one more input per weight, the expert's whole scale block [ceil(in/128),
ceil(out/128)] in SMEM, indexed like the weights (copied once per active expert), and the contraction runs
in chunks of at most 128 rows, each chunk's tile dequantised with its block's scale (`dequant.py`); a column
block lies inside one scale block (`dispatch.check_blocks`).
Letters: M sorted rows, D hidden, F expert width, E experts, L layers, W work items, Db/Fb scale blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from caee_jax.pallas.dequant import contraction_chunks, widen
from caee_jax.pallas.layout import GroupLayout
from caee_jax.routing.storage import BLOCK

_METADATA = 6  # scalar-prefetch operands: item_tile, item_expert, group_start, group_end, num_items, layer


def _write_own_rows(out_ref, value, w, tile_ref, expert_ref, start_ref, end_ref, block_m: int):
    """out_ref[rows of item w's expert] = value; the block is zeroed first on its tile's first item."""
    tile, expert = tile_ref[w], expert_ref[w]

    @pl.when((w == 0) | (tile_ref[jnp.maximum(w - 1, 0)] != tile))
    def _():
        out_ref[...] = jnp.zeros(out_ref.shape, out_ref.dtype)

    rows = tile * block_m + jax.lax.broadcasted_iota(jnp.int32, out_ref.shape, 0)
    own = (rows >= start_ref[expert]) & (rows < end_ref[expert])
    out_ref[...] = jnp.where(own, value.astype(out_ref.dtype), out_ref[...])


def _dot(a, b):
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=precision)


def _matmul(x_ref, w_ref, scale_ref, j) -> jax.Array:
    """x_ref [bm, K] @ w_ref [K, bn] (column block j of the weight) -> [bm, bn] float32, the weight tile in
    x's dtype.

    scale_ref: the expert's fp8 block scales [Kb, Nb] (SMEM), else None; the tile is then dequantised one
    128-row chunk at a time with the scale of (chunk, the column block holding the tile). Without it, one
    dot over K.
    """
    if scale_ref is None:
        return _dot(x_ref[...], widen(w_ref[...], x_ref.dtype))
    rows = BLOCK[0]
    column = jax.lax.div(j * w_ref.shape[1], BLOCK[1])  # the scale column block holding the tile (j >= 0)
    whole, tail = contraction_chunks(x_ref.shape[1], rows)

    def add_chunk(r, acc, size=rows):
        ks = pl.ds(pl.multiple_of(r * rows, rows), size) if size == rows else pl.ds(r * rows, size)
        return acc + _dot(x_ref[:, ks], widen(w_ref[ks, :], x_ref.dtype, scale_ref[r, column]))

    acc = jnp.zeros((x_ref.shape[0], w_ref.shape[1]), jnp.float32)
    if whole:
        acc = jax.lax.fori_loop(0, whole, add_chunk, acc)
    return add_chunk(whole, acc, tail) if tail else acc


def _swiglu_kernel(tile_ref, expert_ref, start_ref, end_ref, count_ref, layer_ref, x_ref, gate_ref, up_ref, h_ref):
    _swiglu(tile_ref, expert_ref, start_ref, end_ref, count_ref, x_ref, gate_ref, up_ref, None, None, h_ref)


def _swiglu_fp8_kernel(
    tile_ref,
    expert_ref,
    start_ref,
    end_ref,
    count_ref,
    layer_ref,
    x_ref,
    gate_ref,
    up_ref,
    gate_scale_ref,
    up_scale_ref,
    h_ref,
):
    _swiglu(
        tile_ref,
        expert_ref,
        start_ref,
        end_ref,
        count_ref,
        x_ref,
        gate_ref,
        up_ref,
        gate_scale_ref,
        up_scale_ref,
        h_ref,
    )


def _swiglu(tile_ref, expert_ref, start_ref, end_ref, count_ref, x_ref, gate_ref, up_ref, gate_scale, up_scale, h_ref):
    j, w = pl.program_id(0), pl.program_id(1)

    @pl.when(w < count_ref[0])
    def _():
        hidden = jax.nn.silu(_matmul(x_ref, gate_ref, gate_scale, j)) * _matmul(x_ref, up_ref, up_scale, j)
        _write_own_rows(h_ref, hidden, w, tile_ref, expert_ref, start_ref, end_ref, x_ref.shape[0])


def _down_kernel(tile_ref, expert_ref, start_ref, end_ref, count_ref, layer_ref, h_ref, down_ref, out_ref):
    _down(tile_ref, expert_ref, start_ref, end_ref, count_ref, h_ref, down_ref, None, out_ref)


def _down_fp8_kernel(
    tile_ref, expert_ref, start_ref, end_ref, count_ref, layer_ref, h_ref, down_ref, down_scale_ref, out_ref
):
    _down(tile_ref, expert_ref, start_ref, end_ref, count_ref, h_ref, down_ref, down_scale_ref, out_ref)


def _down(tile_ref, expert_ref, start_ref, end_ref, count_ref, h_ref, down_ref, down_scale, out_ref):
    j, w = pl.program_id(0), pl.program_id(1)

    @pl.when(w < count_ref[0])
    def _():
        out = _matmul(h_ref, down_ref, down_scale, j)
        _write_own_rows(out_ref, out, w, tile_ref, expert_ref, start_ref, end_ref, h_ref.shape[0])


def _rows(j, w, tile, *_):
    return tile[w], 0


def _weights(j, w, tile, expert, start, end, count, layer):
    return layer[0], expert[w], 0, j


def _out(j, w, tile, *_):
    return tile[w], j


def _expert_scales(j, w, tile, expert, start, end, count, layer):
    return layer[0], expert[w], 0, 0


def vmem_bytes(block_m: int, block_f: int, block_d: int, d: int, f: int, itemsize: int, weight_itemsize=None) -> int:
    """Double-buffered VMEM of the larger of the two calls (inputs and outputs); weight tiles of
    `weight_itemsize` bytes per element (default: `itemsize`, x's)."""
    wsize = weight_itemsize or itemsize
    swiglu = block_m * d * itemsize + 2 * d * block_f * wsize + block_m * block_f * itemsize
    down = block_m * f * itemsize + f * block_d * wsize + block_m * block_d * 4
    return 2 * max(swiglu, down)


def grouped_swiglu(
    xs: jax.Array,
    gate: jax.Array,
    up: jax.Array,
    down: jax.Array,
    layer: jax.Array,
    layout: GroupLayout,
    *,
    block_m: int,
    block_f: int,
    block_d: int,
    scales=None,
    interpret=False,
) -> jax.Array:
    """xs [M, D] sorted rows; gate, up [L, E, D, F]; down [L, E, F, D]; layer [1] int32 -> [M, D] float32.

    scales: with fp8 weights, their float32 block scales (gate, up [L, E, Db, Fb]; down [L, E, Fb, Db]),
      else None. Rows of tiles that no work item visits are left unwritten (the caller masks them).
    """
    rows, d = xs.shape
    f = gate.shape[-1]
    items = layout.item_tile.shape[0]
    metadata = (*layout.work_list, layer)
    vmem = vmem_bytes(block_m, block_f, block_d, d, f, xs.dtype.itemsize, gate.dtype.itemsize)
    params = pltpu.CompilerParams(
        dimension_semantics=("parallel", "arbitrary"),  # items revisit an output tile: sequential
        vmem_limit_bytes=max(32 << 20, vmem + (8 << 20)),
    )
    call = functools.partial(pl.pallas_call, compiler_params=params, interpret=interpret)
    gate_up = [pl.BlockSpec((None, None, d, block_f), _weights)] * 2
    down_spec = [pl.BlockSpec((None, None, f, block_d), _weights)]
    swiglu_kernel, down_kernel, gate_up_scales, down_scales = _swiglu_kernel, _down_kernel, (), ()
    if scales is not None:
        swiglu_kernel, down_kernel = _swiglu_fp8_kernel, _down_fp8_kernel
        gate_up_scales, down_scales = scales[:2], scales[2:]
        gate_up += [_scale_spec(s) for s in gate_up_scales]
        down_spec += [_scale_spec(s) for s in down_scales]
    hidden = call(
        swiglu_kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=_METADATA,
            grid=(f // block_f, items),
            in_specs=[pl.BlockSpec((block_m, d), _rows), *gate_up],
            out_specs=pl.BlockSpec((block_m, block_f), _out),
        ),
        out_shape=jax.ShapeDtypeStruct((rows, f), xs.dtype),
        name="caee_grouped_swiglu",
    )(*metadata, xs, gate, up, *gate_up_scales)
    return call(
        down_kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=_METADATA,
            grid=(d // block_d, items),
            in_specs=[pl.BlockSpec((block_m, f), _rows), *down_spec],
            out_specs=pl.BlockSpec((block_m, block_d), _out),
        ),
        out_shape=jax.ShapeDtypeStruct((rows, d), jnp.float32),
        name="caee_grouped_down",
    )(*metadata, hidden, down, *down_scales)


def _scale_spec(scale: jax.Array) -> pl.BlockSpec:
    """One expert's whole scale block [Kb, Nb] in SMEM (read as scalars), indexed like its weights."""
    return pl.BlockSpec((None, None, *scale.shape[-2:]), _expert_scales, memory_space=pltpu.SMEM)
