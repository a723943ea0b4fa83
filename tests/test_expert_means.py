"""`mean` compensation: calibrated per-expert mean outputs, their file, and their use inside the MoE layer."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import compile_counter, random_tokens
from flax import nnx
from test_expert_parallel import mesh_of
from test_pruning import single_device_table

import caee_jax
from caee_jax.caee import expert_means
from caee_jax.caee.expert_means import Calibration, ExpertMeansError
from caee_jax.caee.peer_rules import PeerRule
from caee_jax.caee.policy import CAEEConfig
from caee_jax.calibration.expert_means import calibrate
from caee_jax.config import preset
from caee_jax.model.execution import Execution
from caee_jax.model.moe import ExpertMeans, MoE
from caee_jax.model.router import route
from caee_jax.weights.hf_export import hf_tensors

TOKENS = random_tokens(211, (4, 9), seed=3)


def swiglu(x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> np.ndarray:
    """One expert in numpy, float64: x [N, D] -> [N, D]."""
    x, gate, up, down = (np.asarray(a, np.float64) for a in (x, gate, up, down))
    h = x @ gate
    return (h / (1 + np.exp(-h)) * (x @ up)) @ down


def reference_sums(x: np.ndarray, ids: np.ndarray, moe: MoE) -> tuple[np.ndarray, np.ndarray]:
    """x [N, D], ids [N, K] -> (sum of each expert's output over its routed tokens [E, D], counts [E])."""
    gate, up, down = (np.asarray(w[...]) for w in (moe.gate_proj, moe.up_proj, moe.down_proj))
    sums = np.zeros((gate.shape[0], x.shape[-1]))
    for e in range(gate.shape[0]):
        tokens = np.nonzero(ids == e)[0]  # a token appears once per slot routed to e (at most once)
        sums[e] = swiglu(x[tokens], gate[e], up[e], down[e]).sum(0)
    return sums, np.bincount(ids.reshape(-1), minlength=gate.shape[0])


@pytest.fixture(scope="module")
def moe_layer():
    """A random tiny MoE layer (biased router) and an input x [2, 5, D]."""
    config = preset("tiny")
    moe = MoE(config, jnp.float32, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    moe.router_bias[...] = 0.05 * rng.standard_normal(config.n_routed_experts).astype(np.float32)
    x = rng.standard_normal((2, 5, config.hidden_size)).astype(np.float32)
    return moe, x


def test_the_moe_sums_each_experts_output_over_its_routed_tokens(moe_layer):
    moe, x = moe_layer
    y, routing = moe(jnp.asarray(x), Execution(), collect_expert_sums=True)
    plain, plain_routing = moe(jnp.asarray(x), Execution())
    assert plain_routing.expert_sums is None
    np.testing.assert_array_equal(np.asarray(y), np.asarray(plain))  # collecting changes nothing
    ids = np.asarray(routing.topk_ids).reshape(-1, moe.config.num_experts_per_tok)
    want, _ = reference_sums(x.reshape(-1, x.shape[-1]), ids, moe)
    assert np.abs(want).max() > 1e-3
    np.testing.assert_allclose(np.asarray(routing.expert_sums), want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_mean_adds_each_pruned_slots_gate_weight_times_its_experts_mean(moe_layer):
    """Against numpy: y_mean = y_none + sum over pruned slots of w_j * means[e_j], with w_j the router's
    normalised sigmoid score times routed_scaling_factor (the weight the kept slots use)."""
    moe, x = moe_layer
    config = moe.config
    means = np.random.default_rng(1).standard_normal((config.n_routed_experts, config.hidden_size))
    moe.expert_means = ExpertMeans(jnp.asarray(means, jnp.float32), logical_axes=("router", "embed"))
    try:
        rule = PeerRule("top_p", 0.5, compensation="renorm")
        y_none, routing = moe(jnp.asarray(x), Execution(pruning=PeerRule("top_p", 0.5, compensation="none")))
        y_mean, _ = moe(jnp.asarray(x), Execution(pruning=PeerRule("top_p", 0.5, compensation="mean")))
        y_renorm, _ = moe(jnp.asarray(x), Execution(pruning=rule))
    finally:
        moe.expert_means = None
    flat = x.reshape(-1, config.hidden_size).astype(np.float64)
    ids = np.asarray(routing.topk_ids).reshape(-1, config.num_experts_per_tok)
    pruned = ~np.asarray(routing.keep_mask).reshape(ids.shape)
    assert 0 < pruned.sum() < pruned.size
    scores = 1 / (1 + np.exp(-flat @ np.asarray(moe.router[...], np.float64)))
    w = np.take_along_axis(scores, ids, -1)
    w = config.routed_scaling_factor * w / w.sum(-1, keepdims=True)
    added = np.einsum("nk,nkd->nd", np.where(pruned, w, 0), means[ids])
    want = np.asarray(y_none).reshape(flat.shape) + added
    np.testing.assert_allclose(np.asarray(y_mean).reshape(flat.shape), want, rtol=0, atol=1e-5)
    assert np.abs(np.asarray(y_renorm) - np.asarray(y_mean)).max() > 1e-2  # not renorm in disguise


def with_execution(model: caee_jax.Model, execution: Execution, mesh=None) -> caee_jax.Model:
    return caee_jax.Model(model.module, model.tokenizer, execution, mesh)


def numpy_calibration(model: caee_jax.Model, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Means and counts [L, E, ...] of a model whose layers all route ("tiny-all-moe"), layer by layer: each
    MoE input is computed with the model's own attention, each expert's output in numpy."""
    config = model.config
    graphdef, state = nnx.split(model.module.moe_layers)
    h = model.module.embed(jnp.asarray(tokens))
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    sums = np.zeros((config.num_moe_layers, config.n_routed_experts, config.hidden_size))
    counts = np.zeros(sums.shape[:2], np.int64)
    for index in range(config.num_moe_layers):
        layer = nnx.merge(graphdef, jax.tree.map(lambda a, i=index: a[i], state))
        h = h + layer.attn(layer.attn_norm(h), positions, None)[0]
        x = layer.ffn_norm(h)
        flat = np.asarray(x).reshape(-1, config.hidden_size)
        ids, _ = route(jnp.asarray(flat), layer.ffn.router[...], layer.ffn.router_bias[...], config)
        sums[index], counts[index] = reference_sums(flat, np.asarray(ids), layer.ffn)
        h = h + layer.ffn(x, Execution())[0]
    return sums / np.maximum(counts, 1)[..., None], counts


def test_calibration_matches_numpy_and_leaves_unrouted_experts_at_zero():
    model = caee_jax.init_random("tiny-all-moe", seed=2)
    bias = model.module.moe_layers.ffn.router_bias
    bias.set_value(bias.get_value().at[:, 3].set(-100.0))  # expert 3 is never chosen
    model = with_execution(model, Execution())
    tokens = random_tokens(model.config.vocab_size, (4, 8), seed=1)
    result = calibrate(model, tokens.reshape(-1), tokens=32, seq_len=8, batch_size=2, progress=False)
    want_means, want_counts = numpy_calibration(model, tokens)
    assert result.tokens == 32
    np.testing.assert_array_equal(result.counts, want_counts)
    assert (result.counts[:, 3] == 0).all() and (result.means[:, 3] == 0).all()
    assert result.means.dtype == np.float32
    np.testing.assert_allclose(result.means, want_means, rtol=0, atol=1e-5 * np.abs(want_means).max())


def test_mean_restores_the_unpruned_output_when_each_expert_outputs_its_mean():
    """Means calibrated on one token are exactly each routed expert's output there: pruning that token's
    experts with `mean` compensation then gives the unpruned logits; `none` does not."""
    plain = caee_jax.init_random("tiny", seed=5)
    token = np.full((4, 1), 17, np.int32)
    plain.set_expert_means(calibrate(plain, token.reshape(-1), tokens=4, seq_len=1, batch_size=4, progress=False).means)
    want = np.asarray(plain(token))
    mean = np.asarray(with_execution(plain, Execution(pruning=PeerRule("topk", 1, compensation="mean")))(token))
    none = np.asarray(with_execution(plain, Execution(pruning=PeerRule("topk", 1, compensation="none")))(token))
    scale = np.abs(want).max()
    assert np.abs(none - want).max() > 1e-3 * scale
    np.testing.assert_allclose(mean, want, rtol=0, atol=1e-5 * scale)


def random_means(config, seed: int = 0) -> np.ndarray:
    shape = (config.num_moe_layers, config.n_routed_experts, config.hidden_size)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_other_modes_and_no_pruning_are_bit_identical():
    plain = caee_jax.init_random("tiny", seed=5)
    table = single_device_table(plain)
    calibrated = caee_jax.init_random("tiny", seed=5)
    calibrated.set_expert_means(random_means(plain.config))
    want = np.asarray(plain(TOKENS))
    np.testing.assert_array_equal(np.asarray(calibrated(TOKENS)), want)
    for rule in (CAEEConfig(theta=0.0, compensation="mean"), CAEEConfig(enabled=False, compensation="mean")):
        model = with_execution(calibrated, Execution(pruning=rule, cost_table=table))
        np.testing.assert_array_equal(np.asarray(model(TOKENS)), want)
    for rule in (CAEEConfig(theta=1.0), PeerRule("top_p", 0.6, compensation="none")):
        execution = Execution(pruning=rule, cost_table=table)
        pruned = np.asarray(with_execution(plain, execution)(TOKENS))
        np.testing.assert_array_equal(np.asarray(with_execution(calibrated, execution)(TOKENS)), pruned)


def test_caee_with_mean_compensation_changes_the_logits():
    plain = caee_jax.init_random("tiny", seed=5)
    plain.set_expert_means(random_means(plain.config))
    table = single_device_table(plain)
    logits = {
        mode: np.asarray(
            with_execution(plain, Execution(pruning=CAEEConfig(theta=1.0, compensation=mode), cost_table=table))(TOKENS)
        )
        for mode in ("none", "mean")
    }
    assert np.abs(logits["mean"] - logits["none"]).max() > 1e-3


def test_mean_without_calibrated_means_is_an_error():
    model = caee_jax.init_random("tiny", execution=Execution(pruning=PeerRule("topk", 2, compensation="mean")))
    with pytest.raises(ValueError, match="compensation 'mean' needs calibrated per-expert mean outputs"):
        model(TOKENS)
    with pytest.raises(ValueError, match=r"expert means of shape \(2, 16, 8\)"):
        model.set_expert_means(np.zeros((2, 16, 8)))


def test_new_routings_never_recompile():
    model = caee_jax.init_random(
        "tiny", seed=5, execution=Execution(pruning=PeerRule("top_p", 0.6, compensation="mean"))
    )
    model.set_expert_means(random_means(model.config))
    batches = [random_tokens(model.config.vocab_size, (4, 9), seed=s) for s in range(4)]
    with compile_counter() as compiles:
        model(batches[0])
        first = len(compiles)
        for tokens in batches[1:]:
            model(tokens)
    assert len(compiles) == first


def test_calibration_and_mean_compensation_on_an_expert_mesh():
    single = caee_jax.init_random("tiny", seed=5)
    sharded = caee_jax.init_random("tiny", seed=5, mesh=mesh_of("expert=2"))
    tokens = random_tokens(single.config.vocab_size, (8, 6), seed=4).reshape(-1)
    want = calibrate(single, tokens, tokens=48, seq_len=6, batch_size=4, progress=False)
    got = calibrate(sharded, tokens, tokens=48, seq_len=6, batch_size=4, progress=False)
    np.testing.assert_array_equal(got.counts, want.counts)
    np.testing.assert_allclose(got.means, want.means, rtol=0, atol=1e-5 * np.abs(want.means).max())

    execution = Execution(pruning=PeerRule("top_p", 0.6, compensation="mean"))
    means = random_means(single.config)
    single, sharded = with_execution(single, execution), with_execution(single, execution, mesh_of("data=2,expert=2"))
    for model in (single, sharded):
        model.set_expert_means(means)
    assert sharded.state.moe_layers.ffn.expert_means.get_value().sharding.is_fully_replicated
    np.testing.assert_allclose(np.asarray(sharded(TOKENS)), np.asarray(single(TOKENS)), rtol=0, atol=1e-5)


def test_checkpoint_export_ignores_the_means():
    model = caee_jax.init_random("tiny", seed=5)
    want = hf_tensors(model.module)
    model.set_expert_means(random_means(model.config))
    got = hf_tensors(model.module)
    assert set(got) == set(want)
    for name, tensor in want.items():
        np.testing.assert_array_equal(got[name], tensor)


# The file.


@pytest.fixture
def saved(tmp_path):
    """(path of a valid file for the "tiny" preset, its Calibration)."""
    config = preset("tiny")
    counts = np.zeros((config.num_moe_layers, config.n_routed_experts), np.int64)
    counts[:, :4] = 10  # 10 tokens, top-4: 40 routed pairs per layer
    result = Calibration(random_means(config), counts, 10)
    path = str(tmp_path / "means.npz")
    expert_means.save(path, result, config)
    return path, result


def test_file_round_trip_and_load_into_a_model(saved):
    path, result = saved
    model = caee_jax.init_random("tiny")
    loaded = expert_means.load_means(model, path)
    np.testing.assert_array_equal(loaded.means, result.means)
    np.testing.assert_array_equal(loaded.counts, result.counts)
    assert loaded.tokens == 10
    np.testing.assert_array_equal(np.asarray(model.state.moe_layers.ffn.expert_means.get_value()), result.means)


def rewrite(path: str, **changes) -> None:
    with np.load(path) as archive:
        fields = {name: archive[name] for name in archive.files}
    fields.update(changes)
    for name in [name for name, value in changes.items() if value is None]:
        del fields[name]
    with open(path, "wb") as f:
        np.savez(f, **fields)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(hidden_size=np.int64(256)), "field 'hidden_size' is 256; the model has 64"),
        (dict(n_routed_experts=np.int64(32)), "field 'n_routed_experts' is 32; the model has 16"),
        (dict(counts=None), "missing field 'counts'"),
        (dict(format=np.str_("something")), "field 'format' is 'something'"),
        (dict(version=np.int64(2)), "field 'version' is 2"),
        (dict(tokens=np.float64(10)), "field 'tokens' is float64"),
        (dict(means=np.zeros((2, 16, 63), np.float32)), r"field 'means' is float32 \(2, 16, 63\)"),
        (dict(means=np.full((2, 16, 64), np.nan, np.float32)), "field 'means' holds non-finite values"),
        (dict(tokens=np.int64(11)), r"field 'counts' sums to \[40, 40\] per layer; 'tokens' x top-k is 44"),
    ],
)
def test_a_mismatched_file_names_the_file_and_field(saved, changes, message):
    path, _ = saved
    rewrite(path, **changes)
    with pytest.raises(ExpertMeansError, match=message) as error:
        expert_means.read(path, preset("tiny"))
    assert str(error.value).startswith(path)


def test_a_corrupt_or_missing_file_is_a_clear_error(saved, tmp_path):
    path, _ = saved
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ExpertMeansError, match=f"{path}: not an expert-means .npz file"):
        expert_means.read(path, preset("tiny"))
    missing = str(tmp_path / "none.npz")
    with pytest.raises(ExpertMeansError, match=f"{missing}: no such expert-means file"):
        expert_means.read(missing, preset("tiny"))


def test_writing_is_atomic(saved, monkeypatch):
    path, result = saved
    before = open(path, "rb").read()

    def crash(f, **fields):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(OSError, match="disk full"):
        expert_means.save(path, Calibration(result.means + 1, result.counts, 10), preset("tiny"))
    assert open(path, "rb").read() == before
    assert os.listdir(os.path.dirname(path)) == ["means.npz"]


# The launchers.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT}  # this checkout's caee_jax, whichever one is installed


def launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, cwd=ROOT, env=ENV)


def test_eval_py_compensation_mean_with_a_preset_needs_expert_means(tmp_path):
    """(An eval with --compensation mean --expert-means: test_eval_job.py.)"""
    command = ["launch/eval.py", "--preset", "tiny", "--out", str(tmp_path / "out"), "--rules", "top_p"]
    missing = launch(*command, "--knobs", "top_p=0.5", "--compensation", "mean")
    assert missing.returncode != 0 and "--compensation mean with --preset needs --expert-means FILE" in missing.stderr


def test_run_py_accepts_compensation_mean(tiny_means):
    command = ["launch/run.py", "--preset", "tiny", "--prompt-ids", "1,2,3", "--max-new-tokens", "4", "--json"]
    command += ["--prune", "top_p=0.5", "--compensation", "mean"]
    missing = launch(*command)
    assert missing.returncode == 2 and "pass --expert-means FILE" in missing.stderr
    result = launch(*command, "--expert-means", tiny_means)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert "compensation='mean'" in report["pruning"] and len(report["generated_ids"]) == 4


def test_calibrate_means_py_refuses_the_heldout_text(tmp_path):
    heldout = os.path.join(caee_jax.api.BUNDLED_MODEL, "heldout.txt")
    result = launch("launch/calibrate_means.py", "--text", heldout, "--out", str(tmp_path / "means.npz"))
    assert result.returncode == 2 and "is the model's held-out evaluation text" in result.stderr
    assert not os.path.exists(tmp_path / "means.npz")
