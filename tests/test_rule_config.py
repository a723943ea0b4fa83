"""Pruning rules from YAML and the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from caee_jax.caee.peer_rules import PeerRule
from caee_jax.caee.policy import CAEEConfig
from caee_jax.caee.rule_config import load_rule, parse_rule, rule_from_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_default_yaml_is_caee():
    rule = load_rule(os.path.join(ROOT, "configs", "caee", "default.yaml"))
    assert rule == CAEEConfig(theta=0.8, k_min=1, target="floor", slack=0.0, compensation="none")


def test_the_one_device_yaml_takes_the_square_root_of_the_cost():
    rule = load_rule(os.path.join(ROOT, "configs", "caee", "one-device.yaml"))
    assert rule == CAEEConfig(cost_exponent=0.5, expert_importance=True, layer_sensitivity=True)


def test_peer_rules_and_cli_strings():
    assert rule_from_dict({"rule": "top_p", "knob": 0.9, "k_min": 2}) == PeerRule("top_p", 0.9, k_min=2)
    assert parse_rule("caee=1.5") == CAEEConfig(theta=1.5)
    assert parse_rule("topk=6") == PeerRule("topk", 6.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rule: caee\nthetta: 0.5\n", r"rules.yaml: unknown field 'thetta' for rule 'caee'"),
        ("rule: caee\ntheta: -1\n", r"rules.yaml: theta must be a finite number >= 0"),
        ("rule: top_k\nknob: 2\n", r"rules.yaml: rule 'top_k' is not caee or one of"),
        ("theta: 0.5\n", r"rules.yaml: needs a 'rule' field"),
        ("rule: [caee\n", r"rules.yaml: not valid YAML"),
    ],
)
def test_bad_rule_files_name_the_file_and_field(tmp_path, text, message):
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_rule(str(path))


def test_bad_cli_string():
    with pytest.raises(ValueError, match="expected RULE=NUMBER"):
        parse_rule("caee")


def test_run_py_prunes_with_a_peer_rule():
    command = [sys.executable, "launch/run.py", "--preset", "tiny", "--prompt-ids", "1,2,3", "--max-new-tokens", "4"]
    result = subprocess.run(command + ["--prune", "top_p=0.5", "--json"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["pruning"].startswith("PeerRule(name='top_p', knob=0.5")
    assert len(report["generated_ids"]) == 4
