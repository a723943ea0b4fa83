"""launch/eval.py end to end on a tiny random model: records, resumption, table and plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from test_pruning import single_device_table

import caee_jax
from caee_jax.caee.cost_table import save_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = {"rule", "knob", "batch_size", "processes", "top1_acc", "top1_acc_unpruned", "ppl", "ppl_unpruned"}
FIELDS |= {"step_time_s", "step_time_unpruned_s", "agreement", "kl", "pruned_pair_fraction"}
FIELDS |= {"mean_step_time_s", "mean_step_time_unpruned_s", "mean_step_cut_interval"}


def test_eval_job_writes_records_and_resumes(tmp_path, tiny_means):
    """Two cases, a rerun that skips them, and other settings (mean compensation from an expert-means file)
    that make new cases."""
    table = save_table(single_device_table(caee_jax.init_random("tiny")), str(tmp_path))
    (tmp_path / "text.txt").write_text(open(os.path.join(caee_jax.api.BUNDLED_MODEL, "heldout.txt")).read()[:4000])
    command = [sys.executable, "launch/eval.py", "--preset", "tiny", "--eval-file", str(tmp_path / "text.txt")]
    command += ["--out", str(tmp_path / "out"), "--batch-sizes", "2", "--prefix", "4", "--steps", "3"]
    command += ["--eval-tokens", "6", "--cost-table", table, "--rules", "caee,top_p", "--knobs", "caee=1.5;top_p=0.5"]
    command += ["--cut-half-width", "0", "--max-timed-steps", "12"]  # never narrow: timing stops at 12 steps
    first = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert first.returncode == 0, first.stderr[-3000:]
    records = [json.loads(line) for line in open(tmp_path / "out" / "results.jsonl")]
    assert [(r["rule"], r["knob"], r["batch_size"], r["processes"]) for r in records] == [
        ("caee", 1.5, 2, 1),
        ("top_p", 0.5, 2, 1),
    ]
    for r in records:
        assert FIELDS <= set(r)
        assert r["tokens"] == 6 and 0 <= r["pruned_pair_fraction"] <= 1
        assert r["timed_steps"] == 11  # 3 steps measured with accuracy, 9 timed only; the first compiles
        low, high = r["step_cut_interval"]
        assert low <= 1 - r["step_time_s"] / r["step_time_unpruned_s"] <= high
        low, high = r["mean_step_cut_interval"]
        assert low <= 1 - r["mean_step_time_s"] / r["mean_step_time_unpruned_s"] <= high
    assert records[0]["pruned_pair_fraction"] > 0  # theta 1.5 prunes on one device
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(open(tmp_path / "out" / "results.jsonl").readlines()) == 2  # finished cases are skipped
    other = subprocess.run(
        [*command, "--compensation", "mean", "--expert-means", tiny_means],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert other.returncode == 0, other.stderr[-3000:]
    records = [json.loads(line) for line in open(tmp_path / "out" / "results.jsonl")]
    assert len(records) == 4  # other settings: new cases
    for r in records[2:]:
        assert r["compensation"] == "mean" and r["expert_means"] == tiny_means
        assert r["pruned_pair_fraction"] > 0 and r["kl"] > 0
    table_text = (tmp_path / "out" / "results.md").read_text()
    assert "| 1 | 2 | caee | 1.5 |" in table_text and "| 1 | 2 | caee (compensation=mean) | 1.5 |" in table_text
    assert "| 1 | 2 | caee / best peer |" in table_text
    assert (tmp_path / "out" / "pareto.png").stat().st_size > 0


def test_eval_job_without_a_cost_table_says_so(tmp_path):
    command = [sys.executable, "launch/eval.py", "--preset", "tiny", "--rules", "caee", "--out", str(tmp_path)]
    command += ["--cost-table", str(tmp_path / "missing.json")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode != 0
    assert "no such cost table" in result.stderr
