"""Pallas expert backend, in interpret mode on CPU: exactness against `dense`/`loop`, skipping of pruned experts
(counted from the kernels' own execution), expert parallelism on simulated devices, and lowering for GPU/TPU."""

from __future__ import annotations

import collections
import functools
import inspect
import re
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpreter
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_experts import SHAPE_IDS, SHAPES, assert_close, make_routing, make_weights, make_x, numpy_experts, run

import caee_jax
from caee_jax.experts import ExpertBackend, ExpertWeights
from caee_jax.pallas import default_blocks, dispatch, gpu, run_pallas
from caee_jax.pallas.dispatch import check_blocks
from caee_jax.pallas.layout import group_layout, max_items

PLATFORMS = ["tpu", "gpu"]
OPTIONS = ("platform", "interpret", "block_m", "block_f", "block_d")
run_pallas_jit = jax.jit(run_pallas, static_argnames=OPTIONS)


def pallas(x, ids, weights, keep, w, **options) -> np.ndarray:
    return np.asarray(run_pallas_jit(x, ids, weights, keep, w, **options))


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("platform", PLATFORMS)
def test_pallas_matches_dense_and_loop(shape, platform):
    n, d, f, e, k = shape
    x, (ids, weights, keep), w = make_x(n, d, 2), make_routing(n, e, k, 2), make_weights(d, f, e, 2)
    dense = run(ExpertBackend.DENSE, x, ids, weights, keep, w)
    out = pallas(x, ids, weights, keep, w, platform=platform)
    assert_close(out, dense)
    assert_close(out, run(ExpertBackend.LOOP, x, ids, weights, keep, w))


def test_run_experts_selects_pallas():
    n, d, f, e, k = 33, 24, 10, 12, 4
    x, (ids, weights, keep), w = make_x(n, d), make_routing(n, e, k), make_weights(d, f, e)
    assert_close(run(ExpertBackend.PALLAS, x, ids, weights, keep, w), numpy_experts(x, ids, weights, keep, w))


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("blocks", [(1, 10, 24), (3, 5, 12), (8, 2, 8), (64, 10, 6), (128, 1, 1)], ids=str)
def test_block_sizes_do_not_change_results(platform, blocks):
    """Tiles of 1 row up to more rows than pairs; F and D split into several column blocks or not at all."""
    n, d, f, e, k = 33, 24, 10, 12, 4
    x, (ids, weights, keep), w = make_x(n, d), make_routing(n, e, k), make_weights(d, f, e)
    block_m, block_f, block_d = blocks
    out = pallas(x, ids, weights, keep, w, platform=platform, block_m=block_m, block_f=block_f, block_d=block_d)
    assert_close(out, numpy_experts(x, ids, weights, keep, w))


@pytest.mark.parametrize("platform", PLATFORMS)
def test_all_pairs_pruned_gives_exact_zero(platform):
    n, d, f, e, k = 9, 12, 5, 6, 2
    ids, weights, _ = make_routing(n, e, k)
    out = pallas(make_x(n, d), ids, weights, np.zeros((n, k), bool), make_weights(d, f, e), platform=platform)
    assert out.shape == (n, d) and (out == 0).all()


@pytest.mark.parametrize("platform", PLATFORMS)
def test_pruned_and_unused_experts_never_used(platform):
    """Expert 2 routed but fully pruned, the last expert never routed: NaN weights there must not reach the output."""
    n, d, f, e, k = 20, 10, 4, 7, 3
    x, (ids, weights, keep), w = make_x(n, d), make_routing(n, e - 1, k), make_weights(d, f, e)
    keep[ids == 2] = False
    poisoned = ExpertWeights(*(a.at[jnp.array([2, e - 1])].set(jnp.nan) for a in w))
    out = pallas(x, ids, weights, keep, poisoned, platform=platform, block_m=8)
    assert np.isfinite(out).all()
    assert_close(out, numpy_experts(x, ids, weights, keep, w))


@pytest.mark.parametrize("platform", PLATFORMS)
def test_bf16_matches_dense(platform):
    """bf16 as in test_experts.test_bf16_loop_matches_dense: both round the hidden and outputs to bf16."""
    n, d, f, e, k = 33, 24, 10, 12, 4
    bf16 = jnp.bfloat16
    x, (ids, weights, keep) = make_x(n, d).astype(bf16), make_routing(n, e, k)
    w = make_weights(d, f, e, dtype=bf16)
    dense = run(ExpertBackend.DENSE, x, ids, weights, keep, w)
    out = pallas(x, ids, weights, keep, w, platform=platform)
    assert out.dtype == dense.dtype == bf16
    assert_close(out.astype(np.float32), dense.astype(np.float32), rel=2**-6)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_layer_of_stacked_weights(platform):
    """Weights [L, E, ...] and a traced layer index (as inside the model's scan) read that layer's experts."""
    n, d, f, e, k, layers = 13, 16, 6, 5, 2, 3
    x, (ids, weights, keep) = make_x(n, d), make_routing(n, e, k)
    per_layer = [make_weights(d, f, e, seed) for seed in range(layers)]
    stack = ExpertWeights(*(jnp.stack(parts) for parts in zip(*per_layer, strict=True)))
    fn = jax.jit(functools.partial(run_pallas, platform=platform))
    for layer in range(layers):
        out = np.asarray(fn(x, ids, weights, keep, stack, layer_index=jnp.int32(layer)))
        assert_close(out, numpy_experts(x, ids, weights, keep, per_layer[layer]))


def test_new_routing_does_not_recompile():
    """The grid is sized for the worst routing; the work list is data. New routings, even none, reuse one executable."""
    n, d, f, e, k = 24, 8, 4, 6, 2
    x, w = make_x(n, d), make_weights(d, f, e)
    routings = [make_routing(n, e, k, seed) for seed in range(2)]
    routings.append((np.tile(np.int32([3, 4]), (n, 1)), routings[0][1], np.ones((n, k), bool)))
    routings.append((routings[0][0], routings[0][1], np.zeros((n, k), bool)))
    fn = jax.jit(lambda *args: run_pallas(*args))
    for ids, weights, keep in routings:
        assert_close(np.asarray(fn(x, ids, weights, keep, w)), numpy_experts(x, ids, weights, keep, w))
    assert fn._cache_size() == 1


def test_layout_work_list():
    """Items are (tile, expert) overlaps in expert order; padding items repeat the last real one."""
    ids = jnp.array([[0, 3], [3, 1], [3, 0], [1, 3], [3, 0]], jnp.int32)  # expert 2 unused
    keep = jnp.ones(ids.shape, bool).at[0, 0].set(False)  # expert 0 keeps 2 pairs, 1: 2, 3: 5
    layout = group_layout(ids, keep, 4, block_m=4)  # rows: 0 0 | 1 1 | 3 3 3 3 3 | pruned, 3 tiles
    assert [int(a) for a in layout.group_start] == [0, 2, 4, 4] and [int(a) for a in layout.group_end] == [2, 4, 4, 9]
    assert int(layout.num_kept) == 9 and int(layout.num_items[0]) == 4
    assert len(layout.item_tile) == max_items(10, 4, 4) == 3 + 4 - 1
    assert [int(a) for a in layout.item_expert] == [0, 1, 3, 3, 3, 3]
    assert [int(a) for a in layout.item_tile] == [0, 0, 1, 2, 2, 2]


# Skipping, measured from the kernels' execution. Sizes: F = 2 column blocks, D = 2 column blocks.
SKIP_D, SKIP_F, BLOCK_F, BLOCK_D, SKIP_N, SKIP_K = 16, 8, 4, 8, 16, 2


def skip_case(num_experts: int, active: int, seed: int = 0):
    """Routing over num_experts, pruned down to `active` experts; returns (x, ids, weights, keep, w, active set)."""
    x, (ids, weights, _), w = (
        make_x(SKIP_N, SKIP_D, seed),
        make_routing(SKIP_N, num_experts, SKIP_K, seed),
        make_weights(SKIP_D, SKIP_F, num_experts, seed),
    )
    routed = np.unique(ids)
    assert active <= len(routed)
    kept = np.random.default_rng(seed).permutation(routed)[:active]
    keep = np.isin(ids, kept)
    return x, ids, weights, keep, w, set(kept.tolist())


@pytest.fixture
def tpu_block_copies(monkeypatch):
    """Records the blocks the TPU interpreter copies from HBM into kernel input buffers: [(input, block index)].

    The interpreter (`interpret=pltpu.InterpretParams()`) simulates Mosaic's pipeline: before a grid step it copies
    an input block only if its block index changed since the previous step, reading it through the module's `get`
    with the kernel argument's name. This hooks that read (a jax-internal function: pinned jax 0.10.2).
    """
    copies = []
    original = tpu_interpreter.get
    signature = inspect.signature(original)

    def get(*args, **kwargs):
        bound = signature.bind(*args, **kwargs).arguments
        if bound.get("input_name") is not None:
            copies.append((bound["input_name"], tuple(int(i) for i in bound["block_indices"])))
        return original(*args, **kwargs)

    monkeypatch.setattr(tpu_interpreter, "get", get)
    return copies


@pytest.mark.parametrize("num_experts", [8, 32])
def test_tpu_weight_blocks_copied_follow_active_experts(tpu_block_copies, num_experts):
    """The TPU kernel copies each active expert's gate/up blocks once per F block and its down blocks once per D
    block, and nothing of any other expert: the copies follow the active experts, not the total."""
    interpret = pltpu.InterpretParams()
    for active in (0, 1, 3, 6):
        x, ids, weights, keep, w, kept = skip_case(num_experts, active)
        tpu_block_copies.clear()
        out = pallas(x, ids, weights, keep, w, platform="tpu", interpret=interpret, block_f=BLOCK_F, block_d=BLOCK_D)
        # The interpreter fills never-written buffers with NaN: an exact match also shows no unwritten row leaks.
        assert_close(out, numpy_experts(x, ids, weights, keep, w))
        copies = collections.Counter(name for name, _ in tpu_block_copies)
        assert active == 0 or copies["x_ref"] > 0, "the hook saw no copy at all: it would not see weight copies"
        assert copies["gate_ref"] == copies["up_ref"] == active * (SKIP_F // BLOCK_F)
        assert copies["down_ref"] == active * (SKIP_D // BLOCK_D)
        weight_blocks = [block for name, block in tpu_block_copies if name.endswith(("gate_ref", "up_ref", "down_ref"))]
        assert {expert for _, expert, *_ in weight_blocks} == kept
        for name in ("gate_ref", "up_ref", "down_ref"):
            blocks = [block for n, block in tpu_block_copies if n == name]
            assert len(blocks) == len(set(blocks)), f"{name}: a block was copied twice"


def test_tpu_expert_spanning_tiles_copies_weights_once(tpu_block_copies):
    """Every token sends one pair to expert 2: its 16 rows span at least 4 tiles of 4 rows (sharing boundary
    tiles with other experts), yet each of its weight blocks is copied once: consecutive items of one expert
    keep the block index."""
    x, ids, weights, _, w, _ = skip_case(8, 8)
    ids[:, 1] = np.where(ids[:, 0] == 2, ids[:, 1], 2)
    assert ((ids == 2).sum(1) == 1).all()
    keep = np.ones(ids.shape, bool)
    layout = group_layout(jnp.asarray(ids), jnp.asarray(keep), 8, block_m=4)
    assert int(jnp.sum(layout.item_expert[: int(layout.num_items[0])] == 2)) >= 4
    interpret = pltpu.InterpretParams()
    out = pallas(x, ids, weights, keep, w, platform="tpu", interpret=interpret, block_m=4, block_f=BLOCK_F)
    assert_close(out, numpy_experts(x, ids, weights, keep, w))
    expert_2 = [block for name, block in tpu_block_copies if name == "gate_ref" and block[1] == 2]
    assert sorted(expert_2) == [(0, 2, 0, j) for j in range(SKIP_F // BLOCK_F)]
    for name in ("gate_ref", "up_ref", "down_ref"):  # and no other expert's block twice either
        blocks = [block for n, block in tpu_block_copies if n == name]
        assert len(blocks) == len(set(blocks)) > 0


def record_load(loads: list, expert, block) -> None:
    loads.append((int(expert), int(block)))


@pytest.mark.parametrize("num_experts", [8, 32])
def test_gpu_weight_loading_programs_follow_active_experts(num_experts):
    """The GPU kernel's programs that load weight tiles (probed in interpret mode) are one per (active expert,
    column block) when all rows fit one tile: gate/up programs per F block, down programs per D block."""
    for active in (0, 1, 3, 6):
        x, ids, weights, keep, w, kept = skip_case(num_experts, active)
        loads = []
        probe = functools.partial(gpu.grouped_swiglu, probe=functools.partial(record_load, loads))
        with mock.patch.dict(dispatch.KERNELS, gpu=probe):  # a new function: traced afresh, with this probe
            run = jax.jit(functools.partial(run_pallas), static_argnames=OPTIONS)
            out = np.asarray(
                run(x, ids, weights, keep, w, platform="gpu", block_m=SKIP_N * SKIP_K, block_f=BLOCK_F, block_d=BLOCK_D)
            )
        assert_close(out, numpy_experts(x, ids, weights, keep, w))
        assert len(loads) == active * (SKIP_F // BLOCK_F + SKIP_D // BLOCK_D)
        assert {expert for expert, _ in loads} == kept


@pytest.mark.parametrize("platform", PLATFORMS)
def test_expert_parallel_on_simulated_devices(platform):
    """4 devices x 2 local experts: each runs the kernel on its own experts (pairs of other shards masked, ids
    made local), outputs are psum-ed. Shard 1's experts are fully pruned, so one device launches nothing."""
    shards, n, d, f, e, k = 4, 20, 12, 6, 8, 3
    x, (ids, weights, keep), w = make_x(n, d), make_routing(n, e, k), make_weights(d, f, e)
    keep &= ~np.isin(ids, [2, 3])
    mesh = jax.make_mesh((shards,), ("expert",), axis_types=(jax.sharding.AxisType.Explicit,))
    local_experts = e // shards

    def local(x, ids, weights, keep, w):
        local_ids = ids - jax.lax.axis_index("expert") * local_experts
        mine = (local_ids >= 0) & (local_ids < local_experts)
        y = run_pallas(x, jnp.where(mine, local_ids, 0), weights, keep & mine, w, platform=platform)
        return jax.lax.psum(y, "expert")

    specs = ExpertWeights(P("expert"), P("expert"), P("expert"))
    mapped = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(), P(), specs), out_specs=P(), check_vma=False)
    w = jax.device_put(w, ExpertWeights(*(NamedSharding(mesh, spec) for spec in specs)))
    out = np.asarray(jax.jit(mapped)(x, ids, weights, keep, w))
    assert_close(out, numpy_experts(x, ids, weights, keep, jax.device_get(w)))


def test_model_with_pallas_backend_matches_loop():
    """`init_random(..., execution="pallas")`: the whole tiny model (expert stacks read per layer inside the scan)."""
    tokens = np.random.default_rng(0).integers(0, 211, (2, 7), dtype=np.int32)
    logits = {b: np.asarray(caee_jax.init_random("tiny", execution=b)(tokens)) for b in ("pallas", "loop")}
    assert_close(logits["pallas"], logits["loop"])


# Lowering for hardware this machine does not have: Mosaic (tpu) and Triton (cuda) kernels are built at lowering.
LOWER_SHAPE = dict(n=16, d=256, f=128, e=8, k=2, layers=2)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    "platform, lowering, target", [("tpu", "tpu", "tpu_custom_call"), ("gpu", "cuda", "__gpu$xla.gpu.triton")]
)
def test_lowers_for_accelerators(platform, lowering, target, dtype):
    """Two kernels (SwiGLU, down projection) as the platform's kernel custom calls, from a CPU-only machine."""
    n, d, f, e, k, layers = LOWER_SHAPE.values()
    spec = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.dtype(dtype))
    args = (
        spec((n, d)),
        jax.ShapeDtypeStruct((n, k), jnp.int32),
        jax.ShapeDtypeStruct((n, k), jnp.float32),
        jax.ShapeDtypeStruct((n, k), jnp.bool_),
        ExpertWeights(spec((layers, e, d, f)), spec((layers, e, d, f)), spec((layers, e, f, d))),
        jax.ShapeDtypeStruct((), jnp.int32),
    )

    def fn(x, ids, weights, keep, w, layer):
        return run_pallas(x, ids, weights, keep, w, layer_index=layer, platform=platform, interpret=False)

    text = jax.jit(fn).trace(*args).lower(lowering_platforms=(lowering,)).as_text()
    assert re.findall(r"custom_call @([\w$.]+)", text) == [target, target]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(x=np.zeros((4, 8), np.float16)), "float32 or bfloat16"),
        (dict(x=make_x(4, 8).astype(jnp.bfloat16)), "gate dtype float32 differs from x dtype bfloat16"),
        (dict(ids=np.zeros((3, 2), np.int32)), "topk_ids must be"),
        (dict(keep=np.ones((4, 2), np.int32)), "keep_mask must be bool"),
        (dict(w=make_weights(6, 4, 3)), "gate must be"),
        (dict(block_f=3), "must divide F"),
        (dict(platform="tpu", interpret=False, block_f=2), "multiple of 128 or the whole dimension"),
        (dict(platform="tpu", interpret=False, block_m=4), "multiple of 8"),
        (dict(platform="gpu", interpret=False, block_m=8, block_f=4, block_d=8), "power of two >= 16"),
        (dict(platform="cpu"), "unknown Pallas platform"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_input_checks(change, message):
    args = dict(x=make_x(4, 8), ids=np.zeros((4, 2), np.int32), weights=np.ones((4, 2), np.float32))
    args.update(keep=np.ones((4, 2), bool), w=make_weights(8, 4, 3))
    options = {key: change.pop(key) for key in list(change) if key not in args}
    args.update(change)
    with pytest.raises(ValueError, match=message):
        run_pallas(*args.values(), **options)


@pytest.mark.parametrize(
    "platform, dtype, expected",
    [("tpu", "bfloat16", (16, 256, 256)), ("tpu", "float32", (8, 256, 256)), ("gpu", "bfloat16", (16, 64, 64))],
)
def test_default_blocks_for_deepseek_decode(platform, dtype, expected):
    """R1 widths (D=7168, F=2048, 256 experts), a 64-token decode step: one row per expert on average."""
    blocks = default_blocks(platform, 64 * 8, 256, 7168, 2048, dtype)
    assert blocks == expected
    check_blocks(platform, False, dtype, 7168, 2048, *blocks)  # valid for the hardware, not only interpret mode
    assert default_blocks(platform, 4096 * 8, 256, 7168, 2048, dtype)[0] == {"tpu": 128, "gpu": 64}[platform]
