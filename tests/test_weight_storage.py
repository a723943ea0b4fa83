"""Routed experts stored as f32, bf16 or fp8 (block-scaled): DeepSeek's block quantisation, the exact
equivalence with a float32 model holding the same values (one device and a mesh), a decode step that
never converts a whole expert stack, and clear errors for weights a backend cannot run."""

from __future__ import annotations

import dataclasses
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from test_bf16_compile import decode_hlo, materialised_f32_shapes
from test_caee_policy import table
from test_expert_parallel import mesh_of, run

import caee_jax
from caee_jax.caee.cost_table import DEFAULT_DIR, CostTable, CostTableError, load_table, save_table
from caee_jax.caee.rule_config import parse_rule
from caee_jax.calibration.costs import calibrate
from caee_jax.calibration.tables import select_table, signature_of
from caee_jax.experts import ExpertBackend, ExpertWeights, run_experts
from caee_jax.model.execution import Execution
from caee_jax.offload.cache import Offload
from caee_jax.routing.storage import FP8_DTYPE, block_dequantize, block_quantize
from caee_jax.runtime import steps
from caee_jax.weights import fp8 as hf_fp8

TOKENS = np.array([[5, 17, 3, 60, 9, 33, 2, 41], [7, 7, 1, 90, 12, 4, 8, 100]], np.int32)


def test_block_quantize_scales_each_block_by_its_amax_over_448():
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.02, (300, 200)).astype(np.float32)  # partial blocks on both edges
    w[128:256, :128] = 0  # an all-zero block
    w[5, 7] = 3.0  # one large value governs its block only
    q, scale = (np.asarray(a) for a in block_quantize(jnp.asarray(w)))
    assert q.dtype == FP8_DTYPE and q.shape == w.shape and scale.shape == (3, 2) and scale.dtype == np.float32
    for i in range(3):
        for j in range(2):
            block = w[128 * i : 128 * (i + 1), 128 * j : 128 * (j + 1)]
            amax = np.abs(block).max()
            assert scale[i, j] == (np.float32(amax) / np.float32(448) if amax > 0 else 1.0)
    assert q[5, 7].astype(np.float32) == 448.0  # the block's largest magnitude maps to e4m3's largest
    assert not q[128:256, :128].astype(np.float32).any()
    back = np.asarray(block_dequantize(jnp.asarray(q), jnp.asarray(scale), jnp.float32))
    expanded = np.repeat(np.repeat(scale, 128, 0), 128, 1)[:300, :200]
    # e4m3 keeps 3 mantissa bits: half a step is 2^-4 relative, subnormals (below 2^-6) 2^-10 absolute.
    np.testing.assert_array_less(np.abs(back - w), np.maximum(np.abs(w) * 2.0**-4, expanded * 2.0**-10) * 1.0001)
    # q is w / scale rounded to nearest e4m3
    want = (w / expanded).astype(ml_dtypes.float8_e4m3fn)
    np.testing.assert_array_equal(q.view(np.uint8), want.view(np.uint8))


def test_block_dequantize_matches_the_release_reference_and_keeps_leading_axes():
    rng = np.random.default_rng(1)
    q = rng.normal(0, 40, (2, 3, 260, 130)).astype(ml_dtypes.float8_e4m3fn)
    scale = rng.uniform(1e-4, 1e-2, (2, 3, 3, 2)).astype(np.float32)
    got = np.asarray(block_dequantize(jnp.asarray(q), jnp.asarray(scale), jnp.float32))
    for i in range(2):
        for j in range(3):
            np.testing.assert_array_equal(got[i, j], hf_fp8.dequantize(q[i, j], scale[i, j]))
    bf16 = np.asarray(block_dequantize(jnp.asarray(q[0, 0]), jnp.asarray(scale[0, 0]), jnp.bfloat16))
    np.testing.assert_array_equal(bf16, hf_fp8.dequantize(q[0, 0], scale[0, 0], dtype=jnp.bfloat16))


def test_block_dequantize_widens_every_e4m3_code_exactly():
    """All 256 byte values (NaN codes included) with a scale of 1 equal ml_dtypes' float32 widening."""
    codes = np.arange(256, dtype=np.uint8).reshape(16, 16).view(FP8_DTYPE)
    got = np.asarray(block_dequantize(jnp.asarray(codes), jnp.ones((1, 1), jnp.float32), jnp.float32))
    np.testing.assert_array_equal(got, codes.astype(np.float32))  # NaN where NaN


def restored(model, weights: str):
    """The same model with its routed experts re-stored as `weights` (a copy)."""
    module = nnx.merge(*nnx.split(model.module))
    module.store_experts(weights)
    return caee_jax.Model(module, execution=model.execution, mesh=model.mesh)


@pytest.mark.parametrize("weights", ["fp8", "bf16"])
def test_stored_experts_equal_a_float32_model_holding_their_values(weights):
    model = caee_jax.init_random("tiny", seed=3, weights=weights)
    assert model.weights == weights and model.dtype == jnp.float32
    want = restored(model, "f32")  # fp8: the dequantised values; bf16: the bf16-rounded values, in float32
    assert want.weights == "f32"
    got_logits, want_logits = np.asarray(model(TOKENS)), np.asarray(want(TOKENS))
    np.testing.assert_allclose(got_logits, want_logits, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(got_logits.argmax(-1), want_logits.argmax(-1))
    if weights == "fp8":  # a decode step through the cache too, and its greedy ids
        for got, expected in zip(*(run(m, TOKENS, TOKENS[:, 0], Execution()) for m in (model, want)), strict=True):
            np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
            np.testing.assert_array_equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("mesh", ["data=2,expert=4", "data_expert=2"])
def test_fp8_experts_on_a_mesh_equal_one_device(mesh):
    """Prefill and a decode step on a data x expert mesh (all_to_all, then gather) and on a data_expert mesh
    (tokens split over the expert devices: all_to_all both)."""
    single = caee_jax.init_random("tiny", seed=3, weights="fp8")
    sharded = caee_jax.init_random("tiny", seed=3, weights="fp8", mesh=mesh_of(mesh))
    both = (run(model, TOKENS, TOKENS[:, 0], Execution()) for model in (sharded, single))
    for got, want in zip(*both, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


def fp8_table(*args, **kwargs) -> CostTable:
    """test_caee_policy's table, calibrated (as it says) with fp8-stored experts."""
    costs = table(*args, **kwargs)
    return dataclasses.replace(costs, signature=dataclasses.replace(costs.signature, weights="fp8"))


def test_caee_prunes_fp8_experts_as_it_prunes_their_float32_values():
    execution = Execution("loop", pruning=parse_rule("caee=1.5"), cost_table=fp8_table(16, 1, 4, backend="loop"))
    model = caee_jax.init_random("tiny", seed=3, weights="fp8", execution=execution)
    pruned = np.asarray(model(TOKENS))
    with pytest.warns(UserWarning, match="weights='fp8', this model holds them as 'f32'"):  # the same table, on purpose
        values = restored(model, "f32")
    np.testing.assert_allclose(pruned, np.asarray(values(TOKENS)), atol=1e-5, rtol=0)
    unpruned = caee_jax.init_random("tiny", seed=3, weights="fp8")
    assert np.abs(pruned - np.asarray(unpruned(TOKENS))).max() > 1e-3  # CAEE did prune


def test_fp8_experts_cannot_be_cut_inside_a_scale_block():
    with pytest.raises(ValueError, match="whole 128-column blocks|does not divide"):
        caee_jax.init_random("tiny", weights="fp8", mesh="expert=4,tensor=2")(TOKENS)


@pytest.mark.parametrize("weights", ["fp8", "bf16"])
def test_the_decode_step_never_converts_a_whole_expert_stack(weights):
    model = caee_jax.init_random("tiny", weights=weights)  # float32 compute
    stacks = {tuple(w.shape) for w in model.module.moe_layers.ffn.expert_weights}
    assert all(len(s) == 4 for s in stacks)  # [L, E, ...]
    layer = {s[1:] for s in stacks}  # one layer's experts [E, ...]
    assert not (stacks | layer) & materialised_f32_shapes(decode_hlo(model, steps.decode_step))


def test_a_float32_model_of_the_same_shapes_would_be_seen_materialising_its_stacks():
    """The check above can fail: dequantising the whole stack before the loop shows in the same HLO scan."""
    model = caee_jax.init_random("tiny", weights="fp8")
    ffn = model.module.moe_layers.ffn
    stacks = {tuple(w.shape) for w in ffn.expert_weights}
    whole = jax.jit(lambda w, s: [block_dequantize(a, b, jnp.float32) * 2 for a, b in zip(w, s, strict=True)])
    hlo = whole.lower(ffn.expert_weights, ffn.expert_scales).compile().as_text()
    assert stacks & materialised_f32_shapes(hlo)


def expert_args(e=4, d=32, f=24):
    rng = np.random.default_rng(0)
    weights = ExpertWeights(
        *(jnp.asarray(rng.normal(0, 0.1, s), jnp.float32) for s in ((e, d, f), (e, d, f), (e, f, d)))
    )
    x = jnp.asarray(rng.normal(size=(5, d)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, e, (5, 2)), jnp.int32)
    return x, ids, jnp.ones((5, 2)), jnp.ones((5, 2), bool), weights


def test_fp8_weights_without_scales_are_refused_naming_the_tensor():
    x, ids, w, keep, weights = expert_args()
    fp8 = ExpertWeights(*(block_quantize(a)[0] for a in weights))
    with pytest.raises(ValueError, match="gate are float8_e4m3fn without block scales"):
        run_experts(x, ids, w, keep, fp8)


def test_block_scales_of_the_wrong_shape_are_refused_naming_the_tensor():
    x, ids, w, keep, weights = expert_args()
    quantised = [block_quantize(a) for a in weights]
    fp8, scales = ExpertWeights(*(q for q, _ in quantised)), ExpertWeights(*(s for _, s in quantised))
    with pytest.raises(ValueError, match=r"down_scale: block scales of shape \(4, 1\)"):
        run_experts(x, ids, w, keep, fp8, scales=scales._replace(down=scales.down[:, 0]))


@pytest.mark.parametrize("backend", ["dense", "capacity"])
def test_a_backend_that_cannot_run_fp8_says_so(backend):
    x, ids, w, keep, weights = expert_args()
    quantised = [block_quantize(a) for a in weights]
    fp8, scales = ExpertWeights(*(q for q, _ in quantised)), ExpertWeights(*(s for _, s in quantised))
    with pytest.raises(ValueError, match=f"backend '{backend}' cannot run fp8-stored experts"):
        run_experts(x, ids, w, keep, fp8, ExpertBackend(backend), scales=scales)
    with pytest.raises(ValueError, match=f"backend '{backend}' cannot run fp8"):
        caee_jax.init_random("tiny", weights="fp8", execution=backend)(TOKENS)


@pytest.mark.parametrize("bad", [np.nan, np.inf, 0.0, -1.0])
def test_scales_that_are_not_finite_and_positive_are_refused_naming_the_tensor(bad):
    model = caee_jax.init_random("tiny", weights="fp8")
    ffn = model.module.moe_layers.ffn
    ffn.up_scale.set_value(ffn.up_scale[...].at[1, 2, 0, 0].set(bad))
    with pytest.raises(
        ValueError, match=r"moe_layers.ffn.up_scale: 1 block scale\(s\) not finite and positive .* at \(1, 2, 0, 0\)"
    ):
        caee_jax.Model(model.module)


def test_a_loaded_model_without_its_scales_is_refused():
    model = caee_jax.init_random("tiny", weights="fp8")
    model.module.moe_layers.ffn.gate_scale = nnx.data(None)
    with pytest.raises(ValueError, match="moe_layers.ffn.gate_proj: float8_e4m3fn weights without block scales"):
        caee_jax.Model(model.module)


def test_fp8_experts_cannot_be_offloaded():
    with pytest.raises(ValueError, match="this model holds them as fp8"):
        caee_jax.init_random("tiny", weights="fp8", offload=Offload())


def test_unknown_storage_is_refused():
    with pytest.raises(ValueError, match=r"weights 'int4' is not one of \('f32', 'bf16', 'fp8'\)"):
        caee_jax.init_random("tiny", weights="int4")


# The storage in a cost table's signature: an expert's activation cost is the reading of its stored bytes.
BUNDLED_TABLE = "cpu-cpu-p1-data1_expert1_tensor1-d256-f256-e32-k4-float32-loop.json"


def test_a_table_signature_names_the_experts_storage():
    config = caee_jax.init_random("tiny").config
    held = signature_of(config, None, jnp.float32, "loop")
    fp8 = signature_of(config, None, jnp.float32, "loop", weights="fp8")
    assert held.weights == "f32" and signature_of(config, None, jnp.bfloat16, "loop").weights == "bf16"
    assert fp8.weights == "fp8" and fp8.slug() == held.slug() + "-fp8"
    assert held.slug().endswith("-float32-loop")  # tables of experts held in the compute dtype keep their names
    # A stored table written before the field was calibrated with the experts in its dtype.
    stored = load_table(os.path.join(DEFAULT_DIR, BUNDLED_TABLE))
    assert stored.signature.weights == "f32" and stored.signature.slug() + ".json" == BUNDLED_TABLE


def test_an_fp8_model_is_refused_the_float32_table_naming_the_field(tmp_path):
    """The stored-table lookup and an explicit table both refuse an f32-calibrated table for fp8 experts,
    naming `weights`; an explicit table with the override is used; an fp8 table is found."""
    shutil.copy(os.path.join(DEFAULT_DIR, BUNDLED_TABLE), tmp_path)
    model = caee_jax.load()
    args = (model.config, None, jnp.float32, "loop")
    assert select_table(*args, directory=str(tmp_path)).signature.weights == "f32"
    with pytest.raises(CostTableError, match=r"no cost table for routed experts stored as weights='fp8'.*'f32'"):
        select_table(*args, directory=str(tmp_path), weights="fp8")
    path = str(tmp_path / BUNDLED_TABLE)
    with pytest.raises(CostTableError, match=r"calibrated for another setup: weights: table 'f32', here 'fp8'"):
        select_table(*args, path, weights="fp8")
    assert select_table(*args, path, weights="fp8", override=True).signature.weights == "f32"
    f32_table = load_table(path)
    fp8_table_path = save_table(
        dataclasses.replace(f32_table, signature=dataclasses.replace(f32_table.signature, weights="fp8")), str(tmp_path)
    )
    assert fp8_table_path.endswith("-float32-loop-fp8.json")
    assert select_table(*args, directory=str(tmp_path), weights="fp8").signature.weights == "fp8"


def test_a_model_warns_when_its_table_prices_other_expert_bytes():
    """A table chosen without the model's storage (or by the override) reaches the model: a warning names it."""
    execution = Execution("loop", pruning=parse_rule("caee=1.5"), cost_table=table(16, 1, 4, backend="loop"))
    with pytest.warns(UserWarning, match=r"weights='f32', this model holds them as 'fp8'"):
        caee_jax.init_random("tiny", weights="fp8", execution=execution)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        caee_jax.init_random("tiny", execution=execution)
        caee_jax.init_random(
            "tiny",
            weights="fp8",
            execution=dataclasses.replace(execution, cost_table=fp8_table(16, 1, 4, backend="loop")),
        )


@pytest.mark.timing
@pytest.mark.parametrize("mesh", [None, "expert=2"])
def test_calibrating_an_fp8_model_times_its_stored_experts(mesh):
    """The calibration runs the layer with the block scales (one device: each shard alone; a mesh: the
    expert-parallel layer too) and writes a table whose signature says fp8."""
    model = caee_jax.init_random("tiny", seed=0, weights="fp8", mesh=mesh and mesh_of(mesh))
    table = calibrate(model, cases_per_size=3, repeats=5)  # one timed run per case fitted zero costs once
    assert table.signature == signature_of(model.config, model.mesh, jnp.float32, "loop", weights="fp8")
    assert table.signature.slug().endswith("-float32-loop-fp8")
    assert all(device.pair_s > 0 or device.activation_s > 0 for device in table.devices)
