"""CAEE's calibrated importance: the options' direction on constructed cases, off = bit-identical, the
calibration (deterministic, resumable), its file, one-layer pruning, and the launchers' refusals."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import compile_counter, random_tokens
from test_caee_policy import table
from test_pruning import single_device_table

import caee_jax
from caee_jax.caee import importance
from caee_jax.caee.importance import Calibration, ImportanceError
from caee_jax.caee.peer_rules import PeerRule
from caee_jax.caee.policy import CAEEConfig, caee_prune
from caee_jax.calibration.importance import calibrate, finish
from caee_jax.calibration.importance import probes as calibration_probes
from caee_jax.eval import results
from caee_jax.model.execution import Execution
from caee_jax.runtime import steps

TOKENS = random_tokens(211, (4, 9), seed=3)
ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_a_large_expert_factor_protects_its_slot_a_small_one_exposes_it():
    """Two tokens, each with two equal-weight slots on single-user experts: with the gate weight alone both
    score alike; scaling expert 1 up and expert 2 down moves the pruning from 1 to 2."""
    ids = jnp.asarray([[0, 1], [3, 2]], jnp.int32)
    weights = jnp.asarray([[0.5, 0.5], [0.5, 0.5]], jnp.float32)
    costs = table(4, 1, 2)
    rule = CAEEConfig(theta=1.2, k_min=0)
    plain = np.asarray(caee_prune(costs, rule, ids, weights).keep_mask)
    assert not plain.any()  # score 1 < theta everywhere: all pruned
    scale = jnp.asarray([1.0, 2.0, 0.5, 1.0])
    scaled = np.asarray(caee_prune(costs, rule, ids, weights, importance_scale=scale).keep_mask)
    np.testing.assert_array_equal(scaled, [[False, True], [False, False]])
    np.testing.assert_array_equal(
        np.asarray(caee_prune(costs, CAEEConfig(theta=0.6, k_min=0), ids, weights, importance_scale=scale).keep_mask),
        [[True, True], [True, False]],  # only expert 2 (score 0.5) is below 0.6
    )


def calibrated_model(seed: int = 5, sensitivity=(1.0, 1.0, 1.0), scale=None) -> caee_jax.Model:
    model = caee_jax.init_random("tiny-all-moe", seed=seed)
    config = model.config
    scale = np.ones((config.num_moe_layers, config.n_routed_experts)) if scale is None else scale
    model.set_importance(scale, np.asarray(sensitivity))
    return model


def routing_of(model: caee_jax.Model, rule, table_) -> np.ndarray:
    """keep_mask [L, B, T, K] of the model's full-sequence pass over TOKENS under `rule`."""
    execution = Execution(pruning=rule, cost_table=table_)
    return np.asarray(steps.routing(model.graphdef, model.state, jnp.asarray(TOKENS), execution=execution)[2])


def test_layer_sensitivity_moves_pruning_to_the_insensitive_layer():
    model = calibrated_model(sensitivity=(4.0, 0.25, 1.0))
    costs = single_device_table(model)
    plain = routing_of(model, CAEEConfig(theta=0.8), costs)
    sensitive = routing_of(model, CAEEConfig(theta=0.8, layer_sensitivity=True), costs)
    pruned = lambda keep: (~keep).reshape(keep.shape[0], -1).sum(-1)  # noqa: E731
    assert pruned(plain).min() > 0
    assert pruned(sensitive)[0] < pruned(plain)[0] and pruned(sensitive)[1] > pruned(plain)[1]


def test_off_is_bit_identical_and_options_need_a_calibration():
    plain = caee_jax.init_random("tiny-all-moe", seed=5)
    calibrated = calibrated_model(sensitivity=(3.0, 0.2, 1.0), scale=np.full((3, 16), 0.3))
    costs = single_device_table(plain)
    execution = Execution(pruning=CAEEConfig(theta=1.0), cost_table=costs)  # today's CAEE: options off
    want = np.asarray(steps.logits(plain.graphdef, plain.state, jnp.asarray(TOKENS), execution=execution)[0])
    got = steps.logits(calibrated.graphdef, calibrated.state, jnp.asarray(TOKENS), execution=execution)[0]
    np.testing.assert_array_equal(np.asarray(got), want)
    on = Execution(pruning=CAEEConfig(theta=1.0, expert_importance=True), cost_table=costs)
    changed = steps.logits(calibrated.graphdef, calibrated.state, jnp.asarray(TOKENS), execution=on)[0]
    assert np.abs(np.asarray(changed) - want).max() > 1e-4
    with pytest.raises(ValueError, match="need an importance calibration"):
        steps.logits(plain.graphdef, plain.state, jnp.asarray(TOKENS), execution=on)


def test_new_importance_values_never_recompile():
    model = calibrated_model()
    execution = Execution(pruning=CAEEConfig(theta=1.0, expert_importance=True, layer_sensitivity=True),
                          cost_table=single_device_table(model))  # fmt: skip
    steps.logits(model.graphdef, model.state, jnp.asarray(TOKENS), execution=execution)
    with compile_counter() as compiles:
        for seed in range(2):
            scale = np.random.default_rng(seed).uniform(0.5, 2, (3, 16))
            model.set_importance(scale, np.asarray([2.0 + seed, 1.0, 0.5]))
            steps.logits(model.graphdef, model.state, jnp.asarray(TOKENS), execution=execution)
    assert len(compiles) == 0


def test_importance_stats_counts_the_correct_predictions_each_probe_loses():
    """The probes' lost correct predictions, against a direct count: next tokens the unpruned model's argmax
    hits and the probe's misses. The tokens are the unpruned model's own greedy predictions, so that most
    are correct."""
    model = caee_jax.init_random("tiny-all-moe", seed=4)
    tokens = jnp.asarray(TOKENS)
    unpruned = Execution()

    def predicted(plan, tokens):  # [B, T]: the argmax next token at each position
        return jnp.argmax(model.module(tokens, execution=plan).logits, -1)

    for _ in range(tokens.shape[1]):  # causal: after k rounds the first k + 1 tokens are greedy
        tokens = jnp.concatenate([tokens[:, :1], predicted(unpruned, tokens)[:, :-1]], axis=1)
    tokens = tokens.at[:, 5].set((tokens[:, 5] + 1) % model.config.vocab_size)  # and a few are not
    plans = calibration_probes(model)
    lost = np.asarray(steps.importance_stats(model.graphdef, model.state, tokens, execution=unpruned, probes=plans)[4])
    base = np.asarray(predicted(unpruned, tokens))[:, :-1]
    truth = np.asarray(tokens)[:, 1:]
    expected = [np.sum((base == truth) & (np.asarray(predicted(plan, tokens))[:, :-1] != truth)) for plan in plans]
    np.testing.assert_array_equal(lost, expected)
    assert (base == truth).mean() > 0.5 and sum(expected) > 0


def test_prune_layers_prunes_only_the_listed_layer():
    model = caee_jax.init_random("tiny-all-moe", seed=5)
    rule = PeerRule("topk", 2)
    keep = np.asarray(
        steps.routing(
            model.graphdef, model.state, jnp.asarray(TOKENS), execution=Execution(pruning=rule, prune_layers=(1,))
        )[2]
    )
    assert keep[0].all() and (keep[1].sum(-1) == 2).all()
    with pytest.raises(ValueError, match="prune_layers must be MoE layer numbers"):
        Execution(prune_layers=(-1,))


def test_calibration_is_deterministic_resumable_and_sensible(tmp_path):
    model = caee_jax.init_random("tiny-all-moe", seed=2)
    ids = random_tokens(model.config.vocab_size, (6, 8), seed=1).reshape(-1)
    args = dict(tokens=48, seq_len=8, batch_size=2, text_sha256="abc", progress=False)
    first = calibrate(model, ids, **args)
    again = calibrate(model, ids, **args)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert first.tokens == 48 and (first.counts.sum(-1) == 48 * model.config.num_experts_per_tok).all()
    typical = (first.counts * first.expert_scale).sum(-1) / first.counts.sum(-1)
    np.testing.assert_allclose(typical, 1.0, rtol=1e-5)  # mean factor over routed pairs is 1
    np.testing.assert_allclose(first.layer_sensitivity.mean(), 1.0, rtol=1e-6)
    assert (first.kl_per_mass > 0).all()
    partial = str(tmp_path / "partial.npz")
    calibrate(model, ids, **(args | dict(tokens=32)), resume_path=partial)  # killed after 2 of 3 batches
    resumed = calibrate(model, ids, **args, resume_path=partial)
    for a, b in zip(first, resumed, strict=True):
        np.testing.assert_array_equal(a, b)


def test_finish_scales_by_rms_output_norm():
    counts = np.asarray([[1, 3, 0]])
    sq = np.asarray([[4.0, 3.0, 0.0]])  # rms 2, 1, (unrouted)
    result = finish(sq, counts, np.asarray([0.2]), np.asarray([0.1]), np.asarray([3.0]), 1, "")
    np.testing.assert_allclose(result.expert_scale, [[2 / 1.25, 1 / 1.25, 1.0]], rtol=1e-6)
    np.testing.assert_allclose(result.kl_per_mass, [2.0])
    np.testing.assert_allclose(result.top1_loss_per_mass, [30.0])


def test_the_sensitivity_follows_the_chosen_measure():
    """Two layers: the first moves the KL more per unit of pruned share, the second loses more correct
    predictions; each measure makes its own layer the sensitive one."""
    sums = (np.ones((2, 1)), np.ones((2, 1)), np.asarray([0.4, 0.2]), np.asarray([2.0, 2.0]), np.asarray([1.0, 3.0]))
    kl = finish(*sums, 1, "", "kl")
    top1 = finish(*sums, 1, "", "top1")
    np.testing.assert_allclose(kl.layer_sensitivity, [4 / 3, 2 / 3], rtol=1e-6)
    np.testing.assert_allclose(top1.layer_sensitivity, [0.5, 1.5], rtol=1e-6)
    assert top1.sensitivity_measure == "top1"
    np.testing.assert_array_equal(kl.top1_loss_per_mass, top1.top1_loss_per_mass)
    with pytest.raises(ValueError, match="correct top-1 predictions lost per unit of gate share"):
        finish(*sums[:4], np.asarray([1.0, 0.0]), 1, "", "top1")


@pytest.fixture
def saved(tmp_path):
    model = caee_jax.init_random("tiny-all-moe", seed=2)
    config = model.config
    counts = np.full((3, 16), config.num_experts_per_tok, np.int64)
    result = Calibration(np.ones((3, 16), np.float32), np.asarray([0.5, 1.5, 1.0], np.float32),
                         np.asarray([0.1, 0.3, 0.2], np.float32), np.asarray([0.02, 0.01, 0.03], np.float32),
                         importance.SensitivityMeasure.KL, counts, 16, "f00")  # fmt: skip
    path = str(tmp_path / "importance.npz")
    importance.save(path, result, config)
    return path, model


def test_file_round_trip_and_load(saved):
    path, model = saved
    result = importance.load_importance(model, path)
    np.testing.assert_array_equal(result.layer_sensitivity, [0.5, 1.5, 1.0])
    np.testing.assert_array_equal(result.top1_loss_per_mass, np.float32([0.02, 0.01, 0.03]))
    assert result.text_sha256 == "f00" and result.sensitivity_measure == "kl"
    np.testing.assert_array_equal(np.asarray(model.module.moe_layers.ffn.layer_sensitivity[...]), [0.5, 1.5, 1.0])


def test_a_file_from_before_the_top1_measure_reads_as_kl_and_a_bad_measure_is_named(saved, tmp_path):
    path, model = saved
    fields = dict(np.load(path))
    older = str(tmp_path / "older.npz")
    np.savez(older, **{k: v for k, v in fields.items() if k not in ("top1_loss_per_mass", "sensitivity_measure")})
    result = importance.read(older, model.config)
    assert result.sensitivity_measure == "kl" and np.isnan(result.top1_loss_per_mass).all()
    np.testing.assert_array_equal(result.layer_sensitivity, [0.5, 1.5, 1.0])
    np.savez(older, **(fields | dict(sensitivity_measure=np.str_("flips"))))
    with pytest.raises(ImportanceError, match=rf"{older}: field sensitivity_measure 'flips' is not one of"):
        importance.read(older, model.config)


def test_a_file_for_another_model_names_the_field(saved):
    path, _ = saved
    other = caee_jax.init_random("tiny", seed=2)  # one MoE layer fewer
    with pytest.raises(ImportanceError, match=rf"{path}: field 'num_moe_layers' is 3; the model has 2"):
        importance.read(path, other.config)
    with pytest.raises(ImportanceError, match="no such importance file"):
        importance.read(path + ".missing", other.config)


def test_calibrate_importance_py_refuses_the_heldout_text(tmp_path):
    heldout = os.path.join(caee_jax.api.BUNDLED_MODEL, "heldout.txt")
    copy = tmp_path / "copy.txt"
    copy.write_bytes(open(heldout, "rb").read())
    script = os.path.join(ROOT, "launch", "calibrate_importance.py")
    for text in (heldout, str(copy)):
        done = subprocess.run(
            [sys.executable, script, "--text", text, "--out", str(tmp_path / "x.npz")], capture_output=True, text=True
        )
        assert done.returncode == 2 and "held-out evaluation text" in done.stderr


def test_eval_py_refuses_the_calibration_text_and_run_py_a_peer_rule_with_options(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(open(os.path.join(caee_jax.api.BUNDLED_MODEL, "heldout.txt")).read()[:3000])
    config = caee_jax.init_random("tiny", seed=0).config
    layers, experts = config.num_moe_layers, config.n_routed_experts
    digest = hashlib.sha256(text.read_bytes()).hexdigest()
    counts = np.full((layers, experts), 0, np.int64)
    counts[:, 0] = 4 * config.num_experts_per_tok
    ones = np.ones(layers, np.float32)
    result = Calibration(np.ones((layers, experts), np.float32), ones, ones, ones, "kl", counts, 4, digest)
    path = str(tmp_path / "importance.npz")
    importance.save(path, result, config)
    command = [sys.executable, os.path.join(ROOT, "launch", "eval.py"), "--preset", "tiny", "--eval-file", str(text)]
    command += ["--out", str(tmp_path / "out"), "--rules", "caee", "--layer-sensitivity", "--importance", path]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 2 and "is the text" in done.stderr and "calibrated on" in done.stderr
    run = [sys.executable, os.path.join(ROOT, "launch", "run.py"), "--prune", "top_p=0.9", "--expert-importance"]
    done = subprocess.run(run, capture_output=True, text=True)
    assert done.returncode == 2 and "are CAEE options" in done.stderr


def test_eval_py_turns_the_options_on_when_a_calibration_is_at_hand(tmp_path):
    spec = importlib.util.spec_from_file_location("eval_launcher", os.path.join(ROOT, "launch", "eval.py"))
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)

    def resolved(*argv):
        args = launcher.parse_args(list(argv))
        launcher._resolve_importance_options(args)
        return args.expert_importance, args.layer_sensitivity

    assert resolved() == (True, True)  # the bundled model ships importance.npz
    assert resolved("--no-layer-sensitivity") == (True, False)
    assert resolved("--rules", "top_p") == (False, False)
    assert resolved("--model", str(tmp_path)) == (False, False)  # no calibration there
    assert resolved("--preset", "tiny", "--importance", "x.npz") == (True, True)


def test_the_provenance_names_every_calibration_file(saved, tmp_path):
    path, _ = saved
    text = b"some text"
    record = results.provenance(
        model="tiny", model_dir=None, preset_config=caee_jax.init_random("tiny").config, eval_file="t.txt",
        eval_bytes=text, window={}, mesh="one device", cost_table=None, table=None, expert_means=None,
        importance=path, offload=None,
    )  # fmt: skip
    assert record["calibration_files"] == {
        "importance": dict(path=os.path.abspath(path), sha256=results.sha256_file(path))
    }
    assert record["importance_sha256"] == results.sha256_file(path)
