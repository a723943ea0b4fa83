"""GPU (Pallas on Triton) grouped SwiGLU: one program per (work item, column block), row-masked.

Pallas on Triton has no scalar prefetch, and its BlockSpecs only offset pointers: nothing is read before the
body runs, and a program reads exactly what its body loads. So every operand is passed whole, the work list
is an ordinary operand, and program (w, j) loads item w's weight tiles only inside the body guarded by
"w is a real item":

  1. h[rows, j-block]   = silu(xs @ gate[layer, e][:, j-block]) * (xs @ up[layer, e][:, j-block])
  2. out[rows, j-block] = h @ down[layer, e][:, j-block]

contracting over D in chunks of block_d (stage 1) and over F in chunks of block_f (stage 2). Row loads and
stores are masked to the item's expert's rows (other rows load as 0 and are never stored), so items sharing
a tile write disjoint rows, and no program reads a row that nothing wrote. An expert without kept rows has
no item; padded items load nothing. Triton needs power-of-two tiles of at least 16 rows/columns (checked by
`dispatch.check_blocks`). Weights stored narrower than xs (bf16 under float32 compute) are widened after
the load; fp8 weights are dequantised tile by tile with the scalar scale of the one 128 x 128 scale block
each [block_k, block_n] tile lies in (`dequant.py`), loaded beside it from the scale stack [L, E, Kb, Nb].
Letters: M sorted rows, D hidden, F expert width, L layers, W work items.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from caee_jax.pallas.dequant import widen
from caee_jax.pallas.layout import GroupLayout
from caee_jax.routing.storage import BLOCK


def _dot(a, b):
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None  # not TF32
    return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=precision)


def _item(w, tile_ref, expert_ref, start_ref, end_ref, block_m: int):
    """(expert, row slice, own-row mask [block_m, 1]) of work item w."""
    tile, expert = tile_ref[w], expert_ref[w]
    first = pl.multiple_of(tile * block_m, block_m)
    rows = first + jax.lax.broadcasted_iota(jnp.int32, (block_m, 1), 0)
    own = (rows >= start_ref[expert]) & (rows < end_ref[expert])
    return expert, pl.ds(first, block_m), own


def _matmul_kernel(
    tile_ref,
    expert_ref,
    start_ref,
    end_ref,
    count_ref,
    layer_ref,
    x_ref,
    *refs,
    block_m: int,
    block_n: int,
    block_k: int,
    swiglu: bool,
    scaled: bool,
    probe: Callable | None,
):
    """Program (w, j): x rows of item w @ weight [layer, e][:, j-block] (SwiGLU of two weights if swiglu).

    refs: the weights (one, or gate and up), then with `scaled` their block-scale stacks, then the output.
    """
    *in_refs, out_ref = refs
    w_refs, scale_refs = (in_refs[: len(in_refs) // 2], in_refs[len(in_refs) // 2 :]) if scaled else (in_refs, ())
    w, j = pl.program_id(0), pl.program_id(1)

    @pl.when(w < count_ref[0])
    def _():
        expert, rows, own = _item(w, tile_ref, expert_ref, start_ref, end_ref, block_m)
        layer, cols = layer_ref[0], pl.ds(pl.multiple_of(j * block_n, block_n), block_n)
        if probe is not None:
            jax.debug.callback(probe, expert, j)

        def step(k, accs):
            ks = pl.ds(pl.multiple_of(k * block_k, block_k), block_k)
            x = plgpu.load(x_ref.at[rows, ks], mask=jnp.broadcast_to(own, (block_m, block_k)), other=0)
            block = (layer, expert, jax.lax.div(k * block_k, BLOCK[0]), jax.lax.div(j * block_n, BLOCK[1]))
            scales = [s[block] for s in scale_refs] if scaled else [None] * len(w_refs)
            tiles = [widen(ref[layer, expert, ks, cols], x.dtype, s) for ref, s in zip(w_refs, scales, strict=True)]
            return tuple(acc + _dot(x, tile) for acc, tile in zip(accs, tiles, strict=True))

        zeros = tuple(jnp.zeros((block_m, block_n), jnp.float32) for _ in w_refs)
        accs = jax.lax.fori_loop(0, x_ref.shape[1] // block_k, step, zeros)
        out = jax.nn.silu(accs[0]) * accs[1] if swiglu else accs[0]
        plgpu.store(out_ref.at[rows, cols], out.astype(out_ref.dtype), mask=jnp.broadcast_to(own, out.shape))


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
    num_warps: int = 4,
    num_stages: int = 2,
    scales=None,
    interpret=False,
    probe: Callable | None = None,
) -> jax.Array:
    """xs [M, D] sorted rows; gate, up [L, E, D, F]; down [L, E, F, D]; layer [1] int32 -> [M, D] float32.

    scales: with fp8 weights, their float32 block scales (gate, up [L, E, Db, Fb]; down [L, E, Fb, Db]),
    else None. Rows that belong to no expert are left unwritten (the caller masks them). probe(expert, column_block),
    interpret mode only: called once per program that loads weight tiles (for tests that count them).
    """
    rows, d = xs.shape
    f = gate.shape[-1]
    items = layout.item_tile.shape[0]
    metadata = (*layout.work_list, layer)
    call = functools.partial(
        pl.pallas_call,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
    )
    kernel = functools.partial(_matmul_kernel, block_m=block_m, scaled=scales is not None, probe=probe)
    gate_up_scales, down_scales = ((), ()) if scales is None else (scales[:2], scales[2:])
    hidden = call(
        functools.partial(kernel, block_n=block_f, block_k=block_d, swiglu=True),
        grid=(items, f // block_f),
        out_shape=jax.ShapeDtypeStruct((rows, f), xs.dtype),
        name="caee_grouped_swiglu",
    )(*metadata, xs, gate, up, *gate_up_scales)
    return call(
        functools.partial(kernel, block_n=block_d, block_k=block_f, swiglu=False),
        grid=(items, d // block_d),
        out_shape=jax.ShapeDtypeStruct((rows, d), jnp.float32),
        name="caee_grouped_down",
    )(*metadata, hidden, down, *down_scales)
