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
Letters: M sorted rows, D hidden, F expert width, E experts, L layers, W work items.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from caee_jax.pallas.layout import GroupLayout

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


def _swiglu_kernel(tile_ref, expert_ref, start_ref, end_ref, count_ref, layer_ref, x_ref, gate_ref, up_ref, h_ref):
    w = pl.program_id(1)

    @pl.when(w < count_ref[0])
    def _():
        x = x_ref[...]
        hidden = jax.nn.silu(_dot(x, gate_ref[...])) * _dot(x, up_ref[...])
        _write_own_rows(h_ref, hidden, w, tile_ref, expert_ref, start_ref, end_ref, x_ref.shape[0])


def _down_kernel(tile_ref, expert_ref, start_ref, end_ref, count_ref, layer_ref, h_ref, down_ref, out_ref):
    w = pl.program_id(1)

    @pl.when(w < count_ref[0])
    def _():
        out = _dot(h_ref[...], down_ref[...])
        _write_own_rows(out_ref, out, w, tile_ref, expert_ref, start_ref, end_ref, h_ref.shape[0])


def _rows(j, w, tile, *_):
    return tile[w], 0


def _weights(j, w, tile, expert, start, end, count, layer):
    return layer[0], expert[w], 0, j


def _out(j, w, tile, *_):
    return tile[w], j


def vmem_bytes(block_m: int, block_f: int, block_d: int, d: int, f: int, itemsize: int) -> int:
    """Double-buffered VMEM of the larger of the two calls (inputs and outputs)."""
    swiglu = block_m * d * itemsize + 2 * d * block_f * itemsize + block_m * block_f * itemsize
    down = block_m * f * itemsize + f * block_d * itemsize + block_m * block_d * 4
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
    interpret=False,
) -> jax.Array:
    """xs [M, D] sorted rows; gate, up [L, E, D, F]; down [L, E, F, D]; layer [1] int32 -> [M, D] float32.

    Rows of tiles that no work item visits are left unwritten (the caller masks them).
    """
    rows, d = xs.shape
    f = gate.shape[-1]
    items = layout.item_tile.shape[0]
    metadata = (*layout.work_list, layer)
    params = pltpu.CompilerParams(
        dimension_semantics=("parallel", "arbitrary"),  # items revisit an output tile: sequential
        vmem_limit_bytes=max(32 << 20, vmem_bytes(block_m, block_f, block_d, d, f, xs.dtype.itemsize) + (8 << 20)),
    )
    call = functools.partial(pl.pallas_call, compiler_params=params, interpret=interpret)
    hidden = call(
        _swiglu_kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=_METADATA,
            grid=(f // block_f, items),
            in_specs=[
                pl.BlockSpec((block_m, d), _rows),
                pl.BlockSpec((None, None, d, block_f), _weights),
                pl.BlockSpec((None, None, d, block_f), _weights),
            ],
            out_specs=pl.BlockSpec((block_m, block_f), _out),
        ),
        out_shape=jax.ShapeDtypeStruct((rows, f), xs.dtype),
        name="caee_grouped_swiglu",
    )(*metadata, xs, gate, up)
    return call(
        _down_kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=_METADATA,
            grid=(d // block_d, items),
            in_specs=[pl.BlockSpec((block_m, f), _rows), pl.BlockSpec((None, None, f, block_d), _weights)],
            out_specs=pl.BlockSpec((block_m, block_d), _out),
        ),
        out_shape=jax.ShapeDtypeStruct((rows, d), jnp.float32),
        name="caee_grouped_down",
    )(*metadata, hidden, down)
