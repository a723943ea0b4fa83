"""Where a run's EPLB placement comes from (`parallel/eplb_plan.py`): balanced from the expert-means
calibration's routed-token counts, saved beside the model and checked when read (errors name the field),
and the launchers' flags (`launch/plan_eplb.py`, `launch/run.py --eplb-slots / --eplb-placement`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from test_pruning import single_device_table

import caee_jax
from caee_jax.caee import expert_means
from caee_jax.caee.cost_table import block_placement, save_table
from caee_jax.parallel import eplb, eplb_plan
from caee_jax.parallel.replicas import PlacementError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = caee_jax.preset("tiny")
LAYERS, EXPERTS = CONFIG.num_moe_layers, CONFIG.n_routed_experts


@pytest.fixture(scope="module")
def means_file(tmp_path_factory) -> str:
    """An expert_means.npz for the tiny preset with skewed routed-token counts (the loads)."""
    rng = np.random.default_rng(4)
    skew = rng.zipf(1.5, (LAYERS, EXPERTS)).astype(np.float64)
    counts = np.stack([rng.multinomial(4096 * CONFIG.num_experts_per_tok, row / row.sum()) for row in skew])
    means = np.zeros((LAYERS, EXPERTS, CONFIG.hidden_size), np.float32)
    path = str(tmp_path_factory.mktemp("means") / "expert_means.npz")
    expert_means.save(path, expert_means.Calibration(means, counts, 4096), CONFIG)
    return path


def test_placed_from_the_calibrations_counts_saved_and_read_back(means_file, tmp_path):
    placement, tokens = eplb_plan.from_calibration(means_file, CONFIG, num_slots=20, num_shards=2)
    counts = expert_means.read(means_file, CONFIG).counts
    want = eplb.balance(counts, 20, 2, num_groups=CONFIG.n_group)
    np.testing.assert_array_equal(placement.slot_expert, want.slot_expert)
    assert tokens == 4096 and placement.replica_count.max() > 1
    path = str(tmp_path / "eplb_placement.npz")
    eplb_plan.save(path, placement, CONFIG, counts, tokens)
    read = eplb_plan.read(path, CONFIG, num_shards=2)
    np.testing.assert_array_equal(read.slot_expert, placement.slot_expert)
    np.testing.assert_array_equal(read.replica_rank, placement.replica_rank)
    assert read.num_devices == 2


def test_speed_aware_from_a_cost_table_saved_and_read_back(means_file, tmp_path):
    table = single_device_table(caee_jax.init_random("tiny"))
    slow = dataclasses.replace(table.devices[0], pair_s=3 * table.devices[0].pair_s)
    table = dataclasses.replace(table, devices=(table.devices[0], slow), placement=block_placement(EXPERTS, 2))
    cost = eplb_plan.device_costs(table, 2, tokens=16)
    assert cost[0] == 1 and 1 < cost[1] < 3
    placement, tokens = eplb_plan.from_calibration(means_file, CONFIG, 2 * EXPERTS, 2, cost)
    routed = placement.slot_routed.reshape(LAYERS, 2, -1).sum(-1)
    assert (routed[:, 0] == EXPERTS).all() and (routed[:, 1] < EXPERTS).all()
    path = str(tmp_path / "eplb_placement.npz")
    eplb_plan.save(path, placement, CONFIG, expert_means.read(means_file, CONFIG).counts, tokens, cost)
    read = eplb_plan.read(path, CONFIG, num_shards=2)
    np.testing.assert_array_equal(read.routed_count, placement.routed_count)
    np.testing.assert_allclose(np.load(path)["device_cost"], cost)
    args = argparse.Namespace(eplb_slots=2 * EXPERTS, eplb_placement=None, eplb_loads=means_file, eplb_speed_aware=True)
    np.testing.assert_array_equal(eplb_plan.from_args(args, CONFIG, 2, None, table).routed_count, read.routed_count)
    with pytest.raises(PlacementError, match="--eplb-speed-aware needs the run's cost table"):
        eplb_plan.from_args(args, CONFIG, 2, None)
    with pytest.raises(PlacementError, match="prices 2 expert shard.*this mesh has 4"):
        eplb_plan.from_args(args, CONFIG, 4, None, table)


def test_a_file_for_another_model_or_mesh_is_refused_naming_the_field(means_file, tmp_path):
    placement, tokens = eplb_plan.from_calibration(means_file, CONFIG, num_slots=20, num_shards=2)
    path = str(tmp_path / "eplb_placement.npz")
    eplb_plan.save(path, placement, CONFIG, np.zeros((LAYERS, EXPERTS)), tokens)
    with pytest.raises(PlacementError, match="field 'num_devices' is 2; this mesh has 4 expert shard"):
        eplb_plan.read(path, CONFIG, num_shards=4)
    with pytest.raises(PlacementError, match="field 'num_moe_layers' is 2; the model has 3"):
        eplb_plan.read(path, caee_jax.preset("tiny-all-moe"), num_shards=2)
    with pytest.raises(PlacementError, match="no such EPLB placement file"):
        eplb_plan.read(str(tmp_path / "missing.npz"), CONFIG, num_shards=2)
    with np.load(path) as archive:
        fields = dict(archive)
    broken = str(tmp_path / "broken.npz")
    np.savez(broken, **{**fields, "slot_expert": fields["slot_expert"][:, :-1]})
    with pytest.raises(PlacementError, match="'slot_expert' and 'replica_rank' differ in shape"):
        eplb_plan.read(broken, CONFIG, num_shards=2)
    np.savez(broken, **{**fields, "slot_expert": np.zeros_like(fields["slot_expert"])})
    with pytest.raises(PlacementError, match="broken.npz: the EPLB placement leaves an expert without a slot"):
        eplb_plan.read(broken, CONFIG, num_shards=2)


def test_bad_slot_counts_are_refused(means_file):
    for slots, shards in ((15, 1), (21, 2)):
        with pytest.raises(PlacementError, match=f"{slots} EPLB slots for 16 experts on {shards} expert shard"):
            eplb_plan.from_calibration(means_file, CONFIG, num_slots=slots, num_shards=shards)


def test_load_takes_a_placement_file(means_file, tmp_path):
    placement, tokens = eplb_plan.from_calibration(means_file, CONFIG, num_slots=19, num_shards=1)
    path = str(tmp_path / "eplb_placement.npz")
    eplb_plan.save(path, placement, CONFIG, np.zeros((LAYERS, EXPERTS)), tokens)
    tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 6))
    placed = caee_jax.init_random("tiny", seed=5, placement=path)
    assert placed.placement.num_slots == 19
    want = caee_jax.init_random("tiny", seed=5)(tokens)
    np.testing.assert_allclose(np.asarray(placed(tokens)), np.asarray(want), atol=1e-5, rtol=0)


def launch(*argv):
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_plan_and_run_with_eplb_flags(means_file, tmp_path):
    """Bundled model: launch/plan_eplb.py writes a placement from the model's expert_means.npz counts;
    launch/run.py with --eplb-slots (the same default loads) or --eplb-placement gives the unplaced completion
    and reports the slots. Loads of another model, --eplb-loads alone and too few slots: one-line errors."""
    out = str(tmp_path / "placement.npz")
    assert launch("launch/plan_eplb.py", "--slots", "36", "--shards", "1", "--out", out).returncode == 0
    common = ["launch/run.py", "--prompt-ids", "1,2,3", "--max-new-tokens", "5", "--json"]
    runs = {
        "plain": launch(*common),
        "slots": launch(*common, "--eplb-slots", "36"),
        "file": launch(*common, "--eplb-placement", out),
    }
    reports = {name: json.loads(result.stdout.strip().splitlines()[-1]) for name, result in runs.items()}
    assert reports["slots"]["generated_ids"] == reports["file"]["generated_ids"] == reports["plain"]["generated_ids"]
    assert (
        reports["slots"]["eplb_slots"] == reports["file"]["eplb_slots"] == 36 and reports["plain"]["eplb_slots"] is None
    )
    tiny = ["launch/run.py", "--preset", "tiny", "--prompt-ids", "1,2,3"]
    for argv, fragment in (
        (["launch/plan_eplb.py", "--slots", "36", "--shards", "1", "--loads", means_file, "--out", out],
         "field 'num_moe_layers' is 2; the model has 3"),
        ([*tiny, "--eplb-loads", means_file], "--eplb-loads needs --eplb-slots"),
        ([*tiny, "--eplb-slots", "8", "--eplb-loads", means_file], "8 EPLB slots for 16 experts"),
    ):  # fmt: skip
        result = launch(*argv)
        assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error: "), result.stderr
        assert fragment in result.stderr


def test_eval_runs_eplb_and_caee_with_eplb_beside_caee(means_file, tmp_path):
    """launch/eval.py --rules caee,eplb,caee+eplb --eplb-slots: eplb predicts as the unplaced model (full
    agreement, the same perplexity), caee+eplb prunes, each EPLB case records its placement; the rules and
    the placement flags come together or not at all."""
    table = save_table(single_device_table(caee_jax.init_random("tiny")), str(tmp_path))
    (tmp_path / "text.txt").write_text(open(os.path.join(caee_jax.api.BUNDLED_MODEL, "heldout.txt")).read()[:4000])
    command = ["launch/eval.py", "--preset", "tiny", "--eval-file", str(tmp_path / "text.txt"), "--cost-table", table]
    command += ["--out", str(tmp_path / "out"), "--batch-sizes", "2", "--prefix", "4", "--steps", "3"]
    command += ["--eval-tokens", "6", "--cut-half-width", "0", "--max-timed-steps", "4"]
    rules = ["--rules", "caee,eplb,caee+eplb", "--knobs", "caee=1.5;caee+eplb=1.5"]
    result = launch(*command, *rules, "--eplb-slots", "19", "--eplb-loads", means_file)
    assert result.returncode == 0, result.stderr[-3000:]
    records = {r["rule"]: r for r in map(json.loads, open(tmp_path / "out" / "results.jsonl"))}
    assert sorted(records) == ["caee", "caee+eplb", "eplb"]
    eplb_alone = records["eplb"]
    assert eplb_alone["agreement"] == 1.0 and eplb_alone["pruned_pair_fraction"] == 0.0
    assert abs(eplb_alone["ppl"] / eplb_alone["ppl_unpruned"] - 1) < 1e-5
    assert records["caee+eplb"]["pruned_pair_fraction"] > 0
    assert records["eplb"]["eplb"].startswith("19 slots") and records["caee"]["eplb"] is None
    assert "| 1 | 2 | caee+eplb | 1.5 |" in (tmp_path / "out" / "results.md").read_text()
    for argv, fragment in ((rules, "give both or neither"), (["--eplb-slots", "19"], "give both or neither")):
        refused = launch(*command, *argv)
        assert refused.returncode == 2 and fragment in refused.stderr, refused.stderr[-3000:]
