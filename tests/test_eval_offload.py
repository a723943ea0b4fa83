"""Evaluation and calibration with offloaded experts: eval.py --offload end to end, each side's own cache,
the offload setup in the provenance, flag mistakes, and calibrate.py's in-situ validation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from test_pruning import single_device_table

import caee_jax
from caee_jax.caee.cost_table import save_table
from caee_jax.caee.peer_rules import PeerRule
from caee_jax.caee.policy import CAEEConfig
from caee_jax.calibration.costs import calibrate
from caee_jax.calibration.offload_validation import calibrate_offloaded, validate_offloaded
from caee_jax.eval.decode_eval import compare, windows_of
from caee_jax.model.execution import Execution
from caee_jax.offload.cache import Offload
from caee_jax.offload.disk_store import DiskStore, write_disk_store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELDOUT = os.path.join(caee_jax.api.BUNDLED_MODEL, "heldout.txt")
COUNTS = ("hits", "misses", "pruned_misses", "fetches", "blocking_fetches", "prefetched_fetches", "bytes_read")
COUNTS += ("predicted_needed", "predicted_hits")  # every StepStats field but fetch_wait_s (a time)


def launch(*argv):
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=600, cwd=ROOT)


def counts(stats) -> list:
    """Per step (StepStats) or per record side (dict): the counters, without times."""
    return [[s[c] if isinstance(s, dict) else getattr(s, c) for c in COUNTS] for s in stats]


def refused(result, *fragments):
    """Exit 2 with a last stderr line holding every fragment."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert lines and all(f in lines[-1] for f in fragments), lines[-3:]


def test_eval_offloaded_end_to_end_and_its_provenance(tmp_path):
    table = save_table(single_device_table(caee_jax.init_random("tiny")), str(tmp_path))
    text = tmp_path / "text.txt"
    text.write_text(open(HELDOUT).read()[:4000])
    command = ["launch/eval.py", "--preset", "tiny", "--eval-file", str(text), "--out", str(tmp_path / "out")]
    command += ["--batch-sizes", "2", "--prefix", "4", "--steps", "3", "--eval-tokens", "6", "--cost-table", table]
    command += ["--rules", "caee,top_p", "--knobs", "caee=1.5;top_p=0.5", "--price-misses-as", "disk"]
    command += ["--offload", "host", "--cache-experts", "2"]
    first = launch(*command)
    assert first.returncode == 0, first.stderr[-3000:]
    records = [json.loads(line) for line in open(tmp_path / "out" / "results.jsonl")]
    assert [r["rule"] for r in records] == ["caee", "top_p"]
    for r in records:
        assert r["provenance"]["offload"] == dict(
            store="host", store_fingerprint=None, slots=2, policy="lru", prefetch=True, misses_priced_as="disk"
        )
        base, pruned = r["offload"]["unpruned"], r["offload"]["pruned"]
        assert base["pruned_misses"] == 0 and pruned["pruned_misses"] > 0  # both prune misses at these knobs
        assert pruned["bytes_read"] < base["bytes_read"]
        assert base["blocking_fetches"] + base["prefetched_fetches"] == pytest.approx(base["fetches"])
        assert base["fetches"] > 0
    # the unpruned side does the same whatever the candidate does
    assert counts([r["offload"]["unpruned"] for r in records[:1]]) == counts([records[1]["offload"]["unpruned"]])
    assert "| blocking fetches / step | hit rate |" in (tmp_path / "out" / "results.md").read_text()
    other = launch(*command[:-1], "3")  # another cache size: another experiment
    refused(other, "offload", "--fresh")


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--store-dir", "somewhere"], "--store-dir need --offload"),
        (["--offload", "disk"], "--offload disk needs --store-dir"),
        (["--offload", "host", "--local-processes", "2"], "drop --local-processes"),
        (["--offload", "disk", "--store-dir", "/nonexistent-store"], "not an expert store"),
        (["--price-misses-as", "disk"], "add --offload host"),
    ],
)
def test_eval_offload_flag_mistakes(tmp_path, flags, fragment):
    command = ["launch/eval.py", "--preset", "tiny", "--rules", "top_p", "--out", str(tmp_path / "out")]
    refused(launch(*command, *flags), fragment)


def test_each_side_has_its_own_cache():
    """The unpruned side's cache statistics do not depend on the candidate; an unpruned candidate on its own
    manager does exactly what the baseline does (the same warm-up and steps)."""
    model = caee_jax.init_random("tiny", offload=Offload("host", experts=3))
    twin = model.execution.offload.twin()
    assert twin is not model.execution.offload and twin.store is not model.execution.offload.store
    windows = windows_of(np.arange(200) % model.config.vocab_size, 9, 4, seed=3)
    same = compare(model, Execution(offload=twin), windows, prefix=4)
    assert counts(same.offload) == counts(same.offload_base) and sum(s.fetches for s in same.offload) > 0
    assert np.mean(np.concatenate(same.agree)) == 1.0 and np.max(np.concatenate(same.kl)) == 0.0
    pruned = compare(model, Execution(pruning=PeerRule("top_p", 0.5), offload=twin), windows, prefix=4)
    assert counts(pruned.offload_base) == counts(same.offload_base)
    assert sum(s.pruned_misses for s in pruned.offload) > 0
    with pytest.raises(ValueError, match="own"):
        compare(model, Execution(offload=model.execution.offload), windows, prefix=4)


def test_a_disk_twin_reads_and_stages_on_its_own(tmp_path):
    model = caee_jax.init_random("tiny")
    write_disk_store(str(tmp_path / "store"), model.config, model.state)
    store = DiskStore(str(tmp_path / "store"), model.config, model.dtype)
    manager = Offload("disk", str(tmp_path / "store"), experts=2).manager(store)
    twin = manager.twin()
    try:
        assert twin.store is not store and twin.store.fingerprint == store.fingerprint and twin.slots == 2
        store.prefetch(0, [6])
        assert not twin.store.ready(0, 6)  # nothing one reader stages is the other's
        for reader in (store, twin.store):
            np.testing.assert_array_equal(
                reader.read(0, 6).down, np.asarray(model.state["moe_layers"]["ffn"]["down_proj"][0, 6])
            )
    finally:
        store.close()
        twin.store.close()


def test_calibrate_validates_offloaded_and_refuses_mistakes(tmp_path):
    table = single_device_table(caee_jax.init_random("tiny"))
    save_table(table, str(tmp_path))
    command = ["launch/calibrate.py", "--preset", "tiny", "--validate", "--out", str(tmp_path), "--json"]
    result = launch(*command, "--offload", "host", "--cache-experts", "4", "--repeats", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["tier"] == "host" and summary["slots"] == 4 and summary["cases"] == 56
    assert summary["misses_per_case"][0] >= 0 and summary["misses_per_case"][2] > 0 and summary["mape"] > 0
    assert (
        summary["in_situ_fetch_s"] >= 0
        and summary["in_situ_fixed_s"] >= 0
        and summary["table_fetch_s"] == table.devices[0].fetch_s[1]
    )
    refused(launch(*command, "--offload", "host", "--out", str(tmp_path / "none")), "no such cost table")
    path = save_table(table, str(tmp_path), {"command": "the resident calibration"})
    calibrated = launch(
        *command[:3], "--out", str(tmp_path), "--json", "--offload", "host", "--repeats", "1", "--cases-per-size", "4"
    )
    assert calibrated.returncode == 0, calibrated.stderr[-3000:]
    report = json.loads(calibrated.stdout.strip().splitlines()[-1])
    stored = json.load(open(path))
    assert report["table"] == path and stored["command"] == "the resident calibration"  # provenance kept
    assert stored["offload_host"]["command"].endswith("--offload host --repeats 1 --cases-per-size 4")
    device = stored["devices"][0]
    for name in ("fetch_s", "offload_layer_s", "offload_read_s"):
        assert device[name][1] == report[name]
    assert device["fetch_s"][2] == table.devices[0].fetch_s[2] and device["offload_layer_s"][2] == 0


@pytest.mark.timing
def test_the_in_situ_calibrated_table_predicts_offloaded_layers_with_misses():
    """calibrate_offloaded's fetch_s, offload_layer_s and offload_read_s, checked on other routings: measured /
    predicted has its median (the machine's speed at validation against calibration) in (0.5, 2) and its median
    deviation from that median at most 25%. A tiny layer is ~1 ms, mostly dispatch: the median error read 9-21%
    in most runs, 32% in one (a whole-machine slowdown between calibration and validation), hence scale and
    spread apart; the issue's 15% MAPE is measured on the bundled model, docs/RESULTS.md. The resident
    calibration (misses at its directly timed fetch_s, no layer cost) is printed beside it, not compared: since
    the host calls became effect-free its misses are cheap and its error (20-57% over 13 runs, against 14-41%
    in situ) is too close to the in-situ table's for a bound that holds on every run."""
    resident_table = calibrate(caee_jax.init_random("tiny"), cases_per_size=3, repeats=15)
    model = caee_jax.init_random("tiny", offload=Offload("host", experts=4))
    table, timed = calibrate_offloaded(model, resident_table, cases_per_size=4, repeats=5)
    (device,), host = table.devices, 1
    assert device.offload_layer_s[host] > 0 and device.fetch_s[host] > 0
    assert device.offload_layer_s[2] == device.offload_read_s[2] == 0
    assert device.fetch_s[2] == resident_table.devices[0].fetch_s[2]  # the other tier untouched
    checked = validate_offloaded(model, table, repeats=5)  # other routings than the calibration's
    assert checked.misses.max() > 0 and np.mean(checked.misses > 0) > 0.5
    uncalibrated = checked.resident_predicted_s + resident_table.devices[0].fetch_s[host] * checked.misses
    before = np.mean(np.abs(uncalibrated - checked.measured_s) / checked.measured_s)
    # This VM's core speed drifts up to 1.6x between seconds (docs/RESULTS.md, the straggler test), so one
    # scale between calibration and validation is the machine's; the spread around it is the table's.
    ratio = checked.measured_s / checked.predicted_s
    scale = float(np.median(ratio))
    spread = float(np.median(np.abs(ratio / scale - 1)))
    print(f"with misses: MAPE {checked.mape:.3f}, scale {scale:.2f}, spread {spread:.3f} (resident: {before:.3f})")
    assert 0.5 < scale < 2 and spread <= 0.25


def test_a_host_store_priced_as_the_disk_tier_decides_as_the_disk_store(tmp_path):
    """eval.py --price-misses-as disk: same residency and prices, so the same decisions and every accuracy
    figure, bit for bit (that the price matters: test_caee_policy.py)."""
    plain = caee_jax.init_random("tiny")
    table = single_device_table(plain)
    write_disk_store(str(tmp_path / "store"), plain.config, plain.state)
    windows = windows_of(np.arange(600) % plain.config.vocab_size, 9, 4, seed=3)

    def run(offload: Offload, table):
        model = caee_jax.Model(caee_jax.init_random("tiny").module, None, "loop", None, offload)  # plain's weights
        twin = model.execution.offload.twin()
        try:
            candidate = Execution(pruning=CAEEConfig(theta=0.7), cost_table=table, offload=twin)
            return compare(model, candidate, windows, prefix=4)
        finally:
            for manager in (model.execution.offload, twin):
                getattr(manager.store, "close", lambda: None)()

    def figures(result):
        arrays = [np.concatenate(getattr(result, name)) for name in ("nll", "kl", "correct", "agree")]
        cache = [[s.hits, s.misses, s.pruned_misses, s.fetches, s.bytes_read] for s in result.offload]
        return arrays, result.kept_pairs, cache  # not blocking against prefetched: only the disk reads ahead

    disk = figures(run(Offload("disk", str(tmp_path / "store"), experts=2), table))
    priced = figures(run(Offload("host", experts=2), table.priced_as("host", "disk")))
    for got, want in zip(priced[0], disk[0], strict=True):
        np.testing.assert_array_equal(got, want)
    assert priced[1:] == disk[1:]
    assert sum(step[2] for step in disk[2]) > 0  # misses were pruned: the prices decided something
