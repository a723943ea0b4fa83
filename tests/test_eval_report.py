"""`launch/eval_report.py`: pooling sweeps; --timing-from takes accuracy from one sweep, step times from another."""

from __future__ import annotations

import importlib.util
import json
import os

from caee_jax.eval.report import rule_label

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("eval_report", os.path.join(ROOT, "launch", "eval_report.py"))
eval_report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(eval_report)


def sweep(directory, cases: list[tuple[str, float, float, float]], tokens: int, text_sha: str = "a" * 64) -> str:
    """A results.jsonl of cases (rule, knob, step_time_s, top1_acc) on one text; unpruned: step 1 s, top-1 0.5."""
    os.makedirs(directory)
    with open(os.path.join(directory, "results.jsonl"), "w") as f:
        for rule, knob, step_s, top1 in cases:
            provenance = dict(eval_file="/texts/heldout.txt", eval_sha256=text_sha, eval_tokens=tokens, code="git x")
            record = dict(
                rule=rule, knob=knob, batch_size=1, processes=1, pruned_pair_fraction=knob, step_time_s=step_s,
                step_time_unpruned_s=1.0, step_cut_interval=[1 - step_s - 0.01, 1 - step_s + 0.01], timed_steps=tokens,
                top1_acc=top1, top1_acc_unpruned=0.5, top1_diff_se=0.001, ppl=10.0, ppl_unpruned=10.0, agreement=0.9,
                kl=0.01, predicted_moe_s=0.0, predicted_moe_unpruned_s=0.0, provenance=provenance,
            )  # fmt: skip
            f.write(json.dumps(record) + "\n")
    return str(directory)


def test_accuracy_comes_from_the_runs_and_step_times_from_the_timing_sweep(tmp_path):
    quality = sweep(tmp_path / "quality", [("caee", 0.3, 0.9, 0.499), ("top_p", 0.6, 0.9, 0.498)], tokens=32768)
    timing = sweep(tmp_path / "timing", [("caee", 0.3, 0.6, 0.4), ("top_p", 0.6, 0.8, 0.4)], tokens=8192)
    out = tmp_path / "report"
    assert eval_report.main(["--runs", quality, "--timing-from", timing, "--out", str(out)]) == 0
    table = (out / "heldout.md").read_text()
    assert "| 1 | 1 | caee | 0.3 | 30.0% | 40.0% [39.0, 41.0] | 0.20 ± 0.40% |" in table
    assert "| 1 | 1 | top_p | 0.6 | 60.0% | 20.0% [19.0, 21.0] | 0.40 ± 0.40% |" in table


def test_mean_step_times_come_from_the_timing_sweep_or_not_at_all(tmp_path):
    """The accuracy run's own mean step times never stand in for a timing case that lacks them."""
    quality = sweep(tmp_path / "quality", [("caee", 0.3, 0.9, 0.499)], tokens=32768)
    path = os.path.join(quality, "results.jsonl")
    record = json.loads(open(path).read()) | dict(
        mean_step_time_s=0.5, mean_step_time_unpruned_s=1.0, mean_step_cut_interval=[0.4, 0.6]
    )
    with open(path, "w") as f:
        f.write(json.dumps(record) + "\n")
    timing = sweep(tmp_path / "timing", [("caee", 0.3, 0.6, 0.4)], tokens=8192)
    texts = eval_report.pooled(eval_report.read_sweeps([quality]))
    eval_report.timed_elsewhere(texts, eval_report.pooled(eval_report.read_sweeps([timing])))
    assert "mean_step_time_s" not in texts["heldout"][0] and texts["heldout"][0]["step_time_s"] == 0.6


def test_a_case_without_timing_or_timed_on_another_text_is_refused(tmp_path, capsys):
    quality = sweep(tmp_path / "quality", [("caee", 0.3, 0.9, 0.499), ("caee", 0.5, 0.9, 0.49)], tokens=32768)
    timing = sweep(tmp_path / "timing", [("caee", 0.3, 0.6, 0.4)], tokens=8192)
    assert eval_report.main(["--runs", quality, "--timing-from", timing, "--out", str(tmp_path / "r")]) == 2
    assert "no timing of case ('heldout', 'caee', 0.5" in capsys.readouterr().err
    other = sweep(tmp_path / "other", [("caee", 0.3, 0.6, 0.4)], tokens=8192, text_sha="b" * 64)
    quality_one = sweep(tmp_path / "one", [("caee", 0.3, 0.9, 0.499)], tokens=32768)
    assert eval_report.main(["--runs", quality_one, "--timing-from", other, "--out", str(tmp_path / "s")]) == 2
    assert "timed on another text" in capsys.readouterr().err


def calibrated(directory: str, importance: str, sha: str) -> None:
    """Makes the sweep's records CAEE calibrated by `importance`, a file of content `sha`."""
    path = os.path.join(directory, "results.jsonl")
    records = [json.loads(line) for line in open(path)]
    with open(path, "w") as f:
        for r in records:
            r |= dict(layer_sensitivity=True, importance=importance)
            r["provenance"]["importance_sha256"] = sha
            f.write(json.dumps(r) + "\n")


def test_copies_of_one_importance_file_are_one_rule(tmp_path, capsys):
    """Accuracy on a copy of the model's importance.npz, timing on the model's own: one rule, labelled as the
    model's own; a file of other content stays a rule of its own (its case has no timing)."""
    quality = sweep(tmp_path / "quality", [("caee", 0.3, 0.9, 0.499)], tokens=32768)
    timing = sweep(tmp_path / "timing", [("caee", 0.3, 0.6, 0.4)], tokens=8192)
    calibrated(quality, "/runs/importance-top1.npz", "c" * 64)
    calibrated(timing, "/model/importance.npz", "c" * 64)
    out = tmp_path / "report"
    assert eval_report.main(["--runs", quality, "--timing-from", timing, "--out", str(out)]) == 0
    assert (
        "| 1 | 1 | caee (layer_sensitivity=True) | 0.3 | 30.0% | 40.0% [39.0, 41.0] |"
        in (out / "heldout.md").read_text()
    )
    calibrated(timing, "/model/importance.npz", "d" * 64)
    assert eval_report.main(["--runs", quality, "--timing-from", timing, "--out", str(out)]) == 2
    assert "importance=importance-top1.npz" in capsys.readouterr().err


def test_a_caee_case_on_another_importance_file_is_a_rule_of_its_own():
    """Sweeps of CAEE on two importance calibrations pool as two rules; peers and CAEE without an importance
    option are labelled as before, whatever file the command line named."""
    caee = dict(rule="caee", layer_sensitivity=True, importance="/m/importance.npz")
    assert rule_label(caee) == "caee (layer_sensitivity=True)"
    other = rule_label(caee | dict(importance="/runs/importance-top1.npz"))
    assert other == "caee (layer_sensitivity=True, importance=importance-top1.npz)"
    assert rule_label(dict(rule="mass_ratio", layer_sensitivity=True, importance="/runs/x.npz")) == "mass_ratio"
    assert rule_label(dict(rule="caee", importance="/runs/x.npz")) == "caee"
