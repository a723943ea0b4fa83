"""User mistakes and damaged state around eval.py, run.py and the calibration launchers: each is refused with
a one-line error naming what is at fault (exit 2), or handled (a torn results line, a --fresh rerun)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
from conftest import built_once
from test_pruning import single_device_table

import caee_jax
from caee_jax.caee.cost_table import save_table
from caee_jax.caee.peer_rules import PeerRule, check_top_k
from caee_jax.caee.policy import CAEEConfig
from caee_jax.caee.rule_config import parse_rule, rule_from_dict
from caee_jax.eval import results
from caee_jax.files import exclusive_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELDOUT = os.path.join(caee_jax.api.BUNDLED_MODEL, "heldout.txt")


def launch(*argv, timeout=600):
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def refused(result, *fragments):
    """Exit 2 with one line on stderr, which holds every fragment."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) >= 1 and all(f in lines[-1] for f in fragments), lines[-3:]
    return lines[-1]


def eval_command(out, text, *extra):
    command = ["launch/eval.py", "--preset", "tiny", "--eval-file", str(text), "--out", str(out)]
    command += ["--batch-sizes", "2", "--prefix", "4", "--steps", "3", "--eval-tokens", "6"]
    return [*command, "--rules", "top_p", "--knobs", "top_p=0.5", *extra]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """An eval.py run that finished one case: (results directory, its text file, the first result)."""

    def run(tmp):
        (tmp / "text.txt").write_text(open(HELDOUT).read()[:4000])
        first = launch(*eval_command(tmp / "out", tmp / "text.txt"))
        assert first.returncode == 0, first.stderr[-3000:]

    tmp = built_once(tmp_path_factory, "finished_eval", run)
    return tmp / "out", tmp / "text.txt", open(tmp / "out" / "results.jsonl").read()


@pytest.fixture
def out(finished, tmp_path):
    """A copy of the finished results directory, for a test to change."""
    directory = tmp_path / "out"
    directory.mkdir()
    (directory / "results.jsonl").write_text(finished[2])
    return directory


# 1. Provenance: a rerun on anything else never reuses the old records.


def test_records_carry_their_provenance(finished):
    (record,) = [json.loads(line) for line in finished[2].splitlines()]
    provenance = record["provenance"]
    assert set(results.EXPERIMENT) | set(results.PER_CASE) <= set(provenance)
    assert provenance["eval_tokens"] == 6 and provenance["prefix"] == 4 and provenance["steps"] == 3
    assert provenance["model"] == "tiny" and provenance["eval_file"] == str(finished[1])
    assert provenance["code"].startswith(("git ", "caee_jax "))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ("eval_file", "eval_sha256"),
        ("--eval-tokens", "eval_tokens"),
        ("--steps", "steps"),
        ("--dtype", "dtype"),
        ("--weights", "weights"),
    ],
)
def test_a_rerun_on_other_inputs_is_refused(finished, out, tmp_path, change, field):
    text = finished[1]
    command = eval_command(out, text)
    if change == "eval_file":
        text = tmp_path / "other.txt"
        text.write_text(open(HELDOUT).read()[4000:8000])
        command = eval_command(out, text)
    elif change in command:
        command[command.index(change) + 1] = {"--eval-tokens": "12", "--steps": "2"}[change]
    else:
        command += [change, {"--dtype": "bfloat16", "--weights": "fp8"}[change]]
    refused(launch(*command), "results.jsonl:1", field, "--fresh")
    assert open(out / "results.jsonl").read() == finished[2]  # untouched
    assert not (out / "results.md").exists()  # no table drawn from the old records


def test_fresh_moves_the_old_results_aside(finished, out, tmp_path):
    text = tmp_path / "other.txt"
    text.write_text(open(HELDOUT).read()[4000:8000])
    result = launch(*eval_command(out, text, "--fresh"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "moved the old results to" in result.stderr
    (aside,) = [
        p for p in os.listdir(out) if p.startswith("results.") and p.endswith(".jsonl") and p != "results.jsonl"
    ]
    assert open(out / aside).read() == finished[2]
    (record,) = [json.loads(line) for line in open(out / "results.jsonl")]
    assert record["provenance"]["eval_file"] == str(text)


def test_records_of_an_older_eval_py_are_refused(out, finished):
    record = json.loads(finished[2])
    del record["provenance"]
    (out / "results.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(results.ResultsError, match=r"results.jsonl:1: a record without provenance"):
        results.check(str(out / "results.jsonl"), [record], json.loads(finished[2])["provenance"], [])


# 2. A torn last line (an interrupted run) is dropped and cut off; a bad line elsewhere is named.


def test_a_torn_last_line_is_reported_and_repaired(finished, out):
    (out / "results.jsonl").write_text(finished[2] + finished[2][:40])
    result = launch(*eval_command(out, finished[1]))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "results.jsonl:2: dropped a torn last line" in result.stderr
    assert open(out / "results.jsonl").read() == finished[2]  # repaired; the finished case was skipped


def test_a_bad_line_in_the_middle_names_file_and_line(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"rule": "caee"}\n{"rule": \n{"rule": "top_p"}\n')
    with pytest.raises(results.ResultsError, match=r"results.jsonl:2: not a JSON record"):
        results.read(str(path), repair=True)
    path.write_text('{"rule": "caee"}\n[1, 2]\n')
    with pytest.raises(results.ResultsError, match=r"results.jsonl:2: not a JSON record \(a list\)"):
        results.read(str(path), repair=True)


def test_a_torn_tail_is_cut_only_when_repairing(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"rule": "caee"}\n{"rule": "to')
    records, note = results.read(str(path), repair=False)
    assert records == [{"rule": "caee"}] and "results.jsonl:2: dropped a torn last line" in note
    assert path.read_text().endswith('"to')
    results.read(str(path), repair=True)
    assert path.read_text() == '{"rule": "caee"}\n'


# 3. One run at a time per output directory.


def test_a_second_run_into_the_same_out_is_refused(finished, out):
    with exclusive_lock(str(out)):
        result = launch(*eval_command(out, finished[1]))
    refused(result, "another run holds", str(out), f"pid {os.getpid()}")
    assert open(out / "results.jsonl").read() == finished[2]


# 4. Silently wrong numbers.


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--temperature", "nan", "--temperature: 'nan': must be a finite number >= 0"),
        ("--temperature", "inf", "--temperature: 'inf'"),
        ("--temperature", "-1", "--temperature: '-1'"),
        ("--top-p", "1.5", "--top-p: '1.5': must be a number in (0, 1]"),
        ("--top-p", "nan", "--top-p: 'nan'"),
        ("--prompt-ids", "1,a,3", "--prompt-ids: '1,a,3': 'a' is not a token id"),
    ],
)
def test_run_py_refuses_bad_numbers(flag, value, message):
    result = launch("launch/run.py", "--preset", "tiny", "--max-new-tokens", "2", flag, value)
    refused(result, message)


def test_generate_refuses_nan_sampling():
    model = caee_jax.init_random("tiny")
    for kwargs in (dict(temperature=math.nan), dict(temperature=math.inf), dict(top_p=math.nan)):
        with pytest.raises(ValueError, match="temperature|top_p"):
            caee_jax.generate(model, [[1, 2]], max_new_tokens=2, **kwargs)


@pytest.mark.parametrize(
    ("name", "knob", "message"),
    [
        ("top_p", 2.0, r"top_p: knob must be a finite number in \[0, 1\], got 2.0"),
        ("topk", 1.5, "topk: knob must be a whole number"),
        ("top1_ratio", math.nan, "top1_ratio: knob must be a finite number >= 0, got nan"),
        ("mass_ratio", math.inf, "mass_ratio: knob must be a finite number"),
        ("capacity", -1.0, "capacity: knob must be a finite number >= 0"),
        ("top_p", math.nan, "top_p: knob must be a finite number"),
    ],
)
def test_peer_rules_check_their_knob(name, knob, message):
    with pytest.raises(ValueError, match=message):
        PeerRule(name, knob)


def test_peer_rules_check_their_other_fields():
    with pytest.raises(ValueError, match=r"partial_alpha must be a finite number in \[0, 1\]"):
        PeerRule("top_p", 0.5, partial_alpha=math.nan)
    with pytest.raises(ValueError, match="k_min must be a whole number"):
        PeerRule("top_p", 0.5, k_min=1.5)
    with pytest.raises(ValueError, match="topk: knob 5 is above the model's 4 routed experts"):
        check_top_k(PeerRule("topk", 5), 4)
    check_top_k(PeerRule("topk", 4), 4)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"rule": "caee", "theta": math.nan}, "theta must be a finite number >= 0, got nan"),
        ({"rule": "caee", "theta": math.inf}, "theta must be a finite number"),
        ({"rule": "caee", "slack": math.nan}, "slack must be a finite number >= 0, got nan"),
        ({"rule": "caee", "partial_alpha": 2.0}, "partial_alpha must be a finite number in"),
        ({"rule": "top_p", "knob": 2}, "top_p: knob must be a finite number in"),
    ],
)
def test_rule_files_refuse_nan_and_out_of_range(data, message):
    with pytest.raises(ValueError, match=f"rules.yaml: {message}"):
        rule_from_dict(data, "rules.yaml")


def test_cli_rule_strings_refuse_nan():
    with pytest.raises(ValueError, match=r"pruning 'caee=nan': theta must be a finite number"):
        parse_rule("caee=nan")


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ("top_p=nan", "--knobs top_p=nan: rule top_p: top_p: knob must be a finite number"),
        ("top_p=2", "--knobs top_p=2: rule top_p: top_p: knob must be a finite number in [0, 1]"),
        ("top_p=0.5,x", "--knobs 'top_p=0.5,x': expected rule=number,number"),
        ("caee=0.5", "--knobs 'caee=0.5': rule 'caee' is not among --rules (top_p)"),
    ],
)
def test_eval_py_names_bad_knobs(tmp_path, knobs, message):
    command = eval_command(tmp_path / "out", HELDOUT)
    command[command.index("--knobs") + 1] = knobs
    refused(launch(*command), message)


# 5. Raw exceptions and late failures.


def test_a_binary_eval_file_is_named(tmp_path):
    binary = tmp_path / "data.bin"
    binary.write_bytes(b"ok\xff\xfe\x00" * 100)
    refused(launch(*eval_command(tmp_path / "out", binary)), f"--eval-file {binary}: not UTF-8 text (byte 2")


def test_a_binary_calibration_text_is_named(tmp_path):
    binary = tmp_path / "data.bin"
    binary.write_bytes(b"\xff" * 100)
    result = launch("launch/calibrate_means.py", "--text", str(binary), "--out", str(tmp_path / "m.npz"))
    refused(result, f"--text {binary}: not UTF-8 text (byte 0")


def test_unwritable_outputs_fail_before_the_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    text = tmp_path / "text.txt"
    text.write_text(open(HELDOUT).read()[:4000])
    refused(launch(*eval_command(blocker / "out", text)), f"--out {blocker / 'out'}: cannot write there")
    command = ["launch/calibrate.py", "--preset", "tiny", "--cases-per-size", "1", "--repeats", "1"]
    refused(launch(*command, "--out", str(blocker / "tables")), f"--out {blocker / 'tables'}: cannot write there")
    command = ["launch/calibrate_means.py", "--text", str(text), "--tokens", "64", "--seq-len", "16"]
    refused(launch(*command, "--out", str(blocker / "m.npz")), f"--out {blocker / 'm.npz'}: cannot write there")


# 6. A cost table of another setup: the error names the flag that accepts it.


def test_a_table_of_another_setup_needs_the_flag(tmp_path):
    table = single_device_table(caee_jax.init_random("tiny"))
    other = dataclasses.replace(table, signature=dataclasses.replace(table.signature, device_kind="another device"))
    path = save_table(other, str(tmp_path))
    command = ["launch/run.py", "--preset", "tiny", "--prompt-ids", "1,2,3", "--max-new-tokens", "2"]
    command += ["--prune", "caee=1.0", "--cost-table", path]
    refused(launch(*command), "calibrated for another setup", "to use it anyway: --cost-table-any-setup")
    result = launch(*command, "--cost-table-any-setup")
    assert result.returncode == 0, result.stderr[-3000:]
    text = tmp_path / "text.txt"
    text.write_text(open(HELDOUT).read()[:4000])
    evaluate = eval_command(tmp_path / "out", text, "--cost-table", path)
    evaluate[evaluate.index("--rules") + 1 : evaluate.index("--rules") + 4] = ["caee", "--knobs", "caee=1.0"]
    refused(launch(*evaluate), "to use it anyway: --cost-table-any-setup")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(theta=math.nan), "theta must be a finite number >= 0, got nan"),
        (dict(slack=math.inf), "slack must be a finite number >= 0, got inf"),
        (dict(k_min=0.5), "k_min must be a whole number of slots"),
        (dict(partial_alpha=-0.1), "partial_alpha must be a finite number in"),
    ],
)
def test_caee_config_refuses_nan_built_directly(fields, message):
    with pytest.raises(ValueError, match=message):
        CAEEConfig(**fields)
