"""The Pallas expert kernel on experts stored narrower than the compute dtype: fp8 e4m3 tiles dequantised
in-kernel with their 128x128 block scales, bf16 tiles widened in-kernel. Interpret mode against the float32
values the tiles hold, the whole tiny model against the float32 model holding the dequantised values,
skipping of inactive experts' scales, lowering for TPU and GPU, and the refusals."""

from __future__ import annotations

import collections
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from test_expert_parallel import mesh_of, run
from test_experts import assert_close, make_routing, make_weights, make_x, numpy_experts
from test_pallas import LOWER_SHAPE, tpu_block_copies  # noqa: F401 (a fixture)
from test_weight_storage import TOKENS, restored

import caee_jax
from caee_jax.experts import ExpertBackend, ExpertWeights, run_experts
from caee_jax.model.execution import Execution
from caee_jax.pallas import default_blocks, run_pallas
from caee_jax.pallas.dispatch import check_blocks
from caee_jax.routing.storage import FP8_DTYPE, block_dequantize, block_quantize, scale_shape

PLATFORMS = ["tpu", "gpu"]
OPTIONS = ("platform", "interpret", "block_m", "block_f", "block_d")
run_pallas_jit = jax.jit(run_pallas, static_argnames=OPTIONS)


def quantised(w: ExpertWeights) -> tuple[ExpertWeights, ExpertWeights, ExpertWeights]:
    """(fp8 weights, their block scales, the float32 values they hold) of float weights."""
    pairs = [block_quantize(a) for a in w]
    fp8, scales = ExpertWeights(*(q for q, _ in pairs)), ExpertWeights(*(s for _, s in pairs))
    values = ExpertWeights(*(block_dequantize(q, s, jnp.float32) for q, s in pairs))
    return fp8, scales, values


def spread_blocks(w: ExpertWeights, seed: int = 0) -> ExpertWeights:
    """Weights whose 128x128 blocks differ in magnitude by up to 2^12, so a tile dequantised with a
    neighbouring block's scale cannot pass for the right one."""
    rng = np.random.default_rng(seed)

    def spread(a):
        scale = 2.0 ** rng.integers(-6, 7, scale_shape(a.shape))
        full = np.repeat(np.repeat(scale, 128, -2), 128, -1)[..., : a.shape[-2], : a.shape[-1]]
        return jnp.asarray(np.asarray(a) * full, jnp.float32)

    return ExpertWeights(*(spread(a) for a in w))


# (N, D, F, E, K): several scale blocks each way; D and F not multiples of 128 (partial last blocks); the
# tiny preset's sizes (one partial block each way); one token.
FP8_SHAPES = [(9, 256, 384, 4, 2), (7, 200, 136, 5, 3), (16, 64, 24, 6, 2), (1, 130, 256, 3, 2)]


@pytest.mark.parametrize("shape", FP8_SHAPES, ids=[f"N{n}-D{d}-F{f}-E{e}-K{k}" for n, d, f, e, k in FP8_SHAPES])
@pytest.mark.parametrize("platform", PLATFORMS)
def test_fp8_kernel_equals_the_float32_values_it_holds(shape, platform):
    n, d, f, e, k = shape
    x, (ids, weights, keep) = make_x(n, d), make_routing(n, e, k)
    fp8, scales, values = quantised(spread_blocks(make_weights(d, f, e)))
    out = np.asarray(run_pallas_jit(x, ids, weights, keep, fp8, scales=scales, platform=platform))
    reference = numpy_experts(x, ids, weights, keep, values)
    assert np.abs(reference).max() > 0
    assert_close(out, reference)
    loop = run_experts(*(jnp.asarray(a) for a in (x, ids, weights, keep)), fp8, ExpertBackend.LOOP, scales=scales)
    assert_close(out, np.asarray(loop))


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("blocks", [(8, 128, 128), (16, 64, 32), (1, 16, 128), (64, 128, 16)], ids=str)
def test_fp8_tiles_smaller_than_a_scale_block(platform, blocks):
    """Column and contraction tiles that cut a 128x128 scale block into 2-8 pieces each read its scale."""
    n, d, f, e, k = 12, 256, 256, 5, 3
    x, (ids, weights, keep) = make_x(n, d), make_routing(n, e, k)
    fp8, scales, values = quantised(spread_blocks(make_weights(d, f, e), seed=1))
    block_m, block_f, block_d = blocks
    out = run_pallas_jit(
        x, ids, weights, keep, fp8, scales=scales, platform=platform, block_m=block_m, block_f=block_f, block_d=block_d
    )
    assert_close(np.asarray(out), numpy_experts(x, ids, weights, keep, values))


@pytest.mark.parametrize("platform", PLATFORMS)
def test_fp8_stacked_layers(platform):
    """[L, E, ...] weights and scales with a traced layer index: each layer's own scales."""
    n, d, f, e, k, layers = 10, 256, 128, 4, 2, 3
    x, (ids, weights, keep) = make_x(n, d), make_routing(n, e, k)
    per_layer = [quantised(spread_blocks(make_weights(d, f, e, seed), seed)) for seed in range(layers)]
    fp8s, scale_sets, _ = zip(*per_layer, strict=True)
    stack, stack_scales = (
        ExpertWeights(*(jnp.stack(a) for a in zip(*part, strict=True))) for part in (fp8s, scale_sets)
    )
    fn = jax.jit(functools.partial(run_pallas, platform=platform))
    for layer in range(layers):
        out = fn(x, ids, weights, keep, stack, layer_index=jnp.int32(layer), scales=stack_scales)
        assert_close(np.asarray(out), numpy_experts(x, ids, weights, keep, per_layer[layer][2]))


@pytest.mark.parametrize("platform", PLATFORMS)
def test_inactive_experts_fp8_weights_and_scales_never_used(platform):
    """Expert 2 fully pruned, the last never routed: their e4m3 NaN codes and NaN scales must not reach the output."""
    n, d, f, e, k = 20, 136, 24, 7, 3
    x, (ids, weights, keep) = make_x(n, d), make_routing(n, e - 1, k)
    keep[ids == 2] = False
    fp8, scales, values = quantised(make_weights(d, f, e))
    inactive = jnp.array([2, e - 1])
    nan_code = jnp.asarray(np.full((), 0x7F, np.uint8).view(FP8_DTYPE))
    poisoned = ExpertWeights(*(a.at[inactive].set(nan_code) for a in fp8))
    poisoned_scales = ExpertWeights(*(s.at[inactive].set(jnp.nan) for s in scales))
    out = np.asarray(run_pallas_jit(x, ids, weights, keep, poisoned, scales=poisoned_scales, platform=platform))
    assert np.isfinite(out).all()
    assert_close(out, numpy_experts(x, ids, weights, keep, values))


def test_tpu_scale_blocks_copied_follow_active_experts(tpu_block_copies):  # noqa: F811 (the fixture)
    """The TPU interpreter copies each active expert's scale blocks with its weight blocks (once per column block,
    as the weights) and no other expert's."""
    n, d, f, e, k = 16, 256, 256, 8, 2
    x, (ids, weights, keep) = make_x(n, d), make_routing(n, e, k)
    kept = np.unique(ids)[:3]
    keep = np.isin(ids, kept)
    fp8, scales, values = quantised(make_weights(d, f, e))
    out = run_pallas_jit(x, ids, weights, keep, fp8, scales=scales, platform="tpu", interpret=pltpu.InterpretParams())
    assert_close(np.asarray(out), numpy_experts(x, ids, weights, keep, values))
    copies = collections.Counter(name for name, _ in tpu_block_copies)
    f_blocks, d_blocks = f // 128, d // 128  # the fp8 default column blocks are 128 wide
    assert copies["gate_ref"] == copies["gate_scale_ref"] == copies["up_scale_ref"] == len(kept) * f_blocks
    assert copies["down_ref"] == copies["down_scale_ref"] == len(kept) * d_blocks
    scale_experts = {block[1] for name, block in tpu_block_copies if name.endswith("_scale_ref")}
    assert scale_experts == set(kept.tolist())


def test_bf16_weights_under_float32_compute_are_widened_in_the_kernel():
    n, d, f, e, k = 33, 24, 10, 12, 4
    x, (ids, weights, keep) = make_x(n, d), make_routing(n, e, k)
    w = ExpertWeights(*(a.astype(jnp.bfloat16) for a in make_weights(d, f, e)))
    values = ExpertWeights(*(a.astype(jnp.float32) for a in w))
    for platform in PLATFORMS:
        out = run_pallas_jit(x, ids, weights, keep, w, platform=platform)
        assert out.dtype == jnp.float32
        assert_close(np.asarray(out), numpy_experts(x, ids, weights, keep, values))


@pytest.mark.parametrize("weights", ["fp8", "bf16"])
def test_tiny_model_on_pallas_equals_the_float32_model_holding_its_values(weights):
    """Logits <= 1e-5 and greedy ids through prefill and a decode step: the stored model on the pallas backend
    against the float32 model holding the dequantised (bf16-rounded) values, on the loop backend."""
    model = caee_jax.init_random("tiny", seed=3, weights=weights, execution="pallas")
    want = caee_jax.Model(restored(model, "f32").module, execution="loop")
    assert model.weights == weights and want.weights == "f32"
    got_logits, want_logits = np.asarray(model(TOKENS)), np.asarray(want(TOKENS))
    np.testing.assert_allclose(got_logits, want_logits, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(got_logits.argmax(-1), want_logits.argmax(-1))
    got = run(model, TOKENS, TOKENS[:, 0], Execution("pallas"))
    for got_part, want_part in zip(got, run(want, TOKENS, TOKENS[:, 0], Execution("loop")), strict=True):
        np.testing.assert_allclose(got_part, want_part, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(got_part.argmax(-1), want_part.argmax(-1))


def test_fp8_model_on_pallas_on_an_expert_mesh_equals_one_device():
    sharded = caee_jax.init_random("tiny", seed=3, weights="fp8", mesh=mesh_of("data=2,expert=4"))
    single = caee_jax.init_random("tiny", seed=3, weights="fp8")
    both = (run(sharded, TOKENS, TOKENS[:, 0], Execution("pallas")), run(single, TOKENS, TOKENS[:, 0], Execution()))
    for got, want in zip(*both, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("x_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    "platform, lowering, target", [("tpu", "tpu", "tpu_custom_call"), ("gpu", "cuda", "__gpu$xla.gpu.triton")]
)
def test_fp8_lowers_for_accelerators_taking_the_stored_stacks(platform, lowering, target, x_dtype):
    """Two kernel custom calls whose operands are the float8 stacks [L, E, ...] and float32 scale stacks
    themselves: nothing dequantises a stack outside the kernels."""
    n, d, f, e, k, layers = LOWER_SHAPE.values()
    shapes = ((layers, e, d, f), (layers, e, d, f), (layers, e, f, d))
    w = ExpertWeights(*(jax.ShapeDtypeStruct(s, FP8_DTYPE) for s in shapes))
    scales = ExpertWeights(*(jax.ShapeDtypeStruct(scale_shape(s), jnp.float32) for s in shapes))
    spec = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.float32)
    args = (
        jax.ShapeDtypeStruct((n, d), jnp.dtype(x_dtype)),
        jax.ShapeDtypeStruct((n, k), jnp.int32),
        spec((n, k)),
        jax.ShapeDtypeStruct((n, k), jnp.bool_),
        w,
        jax.ShapeDtypeStruct((), jnp.int32),
        scales,
    )

    def fn(x, ids, weights, keep, w, layer, scales):
        return run_pallas(
            x, ids, weights, keep, w, layer_index=layer, scales=scales, platform=platform, interpret=False
        )

    text = jax.jit(fn).trace(*args).lower(lowering_platforms=(lowering,)).as_text()
    calls = [line for line in text.splitlines() if "custom_call @" in line]
    assert [re.search(r"custom_call @([\w$.]+)", line).group(1) for line in calls] == [target, target]
    stack = "tensor<{}x{}x{}x{}xf8E4M3FN>"
    assert stack.format(*shapes[0]) in calls[0] and stack.format(*shapes[2]) in calls[1]
    assert "tensor<{}x{}x{}x{}xf32>".format(*scale_shape(shapes[0])) in calls[0]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(scales=None), r"gate is float8_e4m3fn without block scales \(gate_scale\)"),
        (
            dict(scales="down_cut"),
            r"down_scale: block scales float32\[3, 1, 1\] for weights \[3, 128, 256\]; need float32\[3, 1, 2\]",
        ),
        (dict(scales="f16"), r"gate_scale: block scales float16"),
        (dict(w="f32"), r"gate is float32 but comes with block scales \(gate_scale\)"),
        (dict(platform="tpu", block_d=256), r"fp8 weights: block_d=256 must divide the 128-wide scale blocks"),
        (dict(platform="gpu", block_d=256), r"fp8 weights: block_d=256 must divide the 128-wide scale blocks"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_fp8_input_checks_name_the_tensor(change, message):
    n, d, f, e, k = 4, 256, 128, 3, 2
    fp8, scales, _ = quantised(make_weights(d, f, e))
    options = dict(change)
    options["scales"] = {
        "keep": scales,
        None: None,
        "down_cut": scales._replace(down=scales.down[:, :, :1]),
        "f16": ExpertWeights(*(s.astype(jnp.float16) for s in scales)),
    }[options.get("scales", "keep")]
    w = make_weights(d, f, e) if options.pop("w", None) else fp8
    routing = (np.zeros((n, k), np.int32), np.ones((n, k), np.float32), np.ones((n, k), bool))
    with pytest.raises(ValueError, match=message):
        run_pallas(make_x(n, d), *routing, w, **options)


def test_fp8_default_blocks_lie_inside_scale_blocks():
    """R1 widths: TPU takes 128-wide tiles (not the 256 of f32/bf16); odd widths fall back to whole dimensions
    up to 128, else to the largest power of two dividing the width and 128 (refused on TPU hardware)."""
    assert default_blocks("tpu", 64 * 8, 256, 7168, 2048, "bfloat16", scaled=True) == (16, 128, 128)
    assert default_blocks("gpu", 64 * 8, 256, 7168, 2048, "bfloat16", scaled=True) == (16, 64, 64)
    check_blocks("tpu", False, "bfloat16", 7168, 2048, 16, 128, 128, scaled=True)
    assert default_blocks("tpu", 32, 16, 64, 24, "float32", scaled=True)[1:] == (24, 64)  # the tiny preset
    assert default_blocks("tpu", 32, 16, 200, 136, "float32", scaled=True)[1:] == (8, 8)
    with pytest.raises(ValueError, match="TPU: block_f=8 must be a multiple of 128"):
        check_blocks("tpu", False, "float32", 200, 136, 8, 8, 8, scaled=True)
