"""Pruning rules from YAML files or `RULE=KNOB` strings (the CLI), with errors naming the file and field.

rule: caee          # or a peer rule: topk, top1_ratio, mass_ratio, top_p, capacity
theta: 0.8          # CAEE: CAEEConfig fields (enabled, theta, k_min, target, slack, compensation, ...)
k_min: 1            # peer rules: knob, k_min, compensation, partial_alpha
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import yaml

from caee_jax.caee.peer_rules import PEER_RULES, PeerRule
from caee_jax.caee.policy import CAEEConfig
from caee_jax.caee.pruning import Pruning


def rule_from_dict(data: Mapping, where: str = "pruning rule") -> Pruning:
    """{"rule": "caee", "theta": 0.8, ...} or {"rule": "top_p", "knob": 0.9, ...} -> a rule."""
    if not isinstance(data, Mapping) or "rule" not in data:
        raise ValueError(f"{where}: needs a 'rule' field (caee or one of {', '.join(PEER_RULES)})")
    fields = dict(data)
    name = fields.pop("rule")
    if name == "caee":
        cls = CAEEConfig
    elif name in PEER_RULES:
        cls, fields = PeerRule, {"name": name, **fields}
    else:
        raise ValueError(f"{where}: rule {name!r} is not caee or one of {', '.join(PEER_RULES)}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(
            f"{where}: unknown field {unknown[0]!r} for rule {name!r} (fields: {', '.join(sorted(known))})"
        )
    try:
        rule = cls(**fields)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: {error}") from error
    return rule


def load_rule(path: str) -> Pruning:
    """A rule from a YAML file."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such pruning rule file") from None
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML ({error})") from error
    return rule_from_dict(data, path)


def rule_of(name: str, knob: float, **settings) -> Pruning:
    """The rule `name` ("caee" or a peer rule) at `knob` (CAEE's theta) with `settings` (its other fields;
    CAEE-only ones are dropped for a peer rule): how a sweep builds its cases."""
    if name == "caee":
        return rule_from_dict({"rule": name, "theta": knob, **settings}, f"rule {name}")
    peer_fields = {f.name for f in dataclasses.fields(PeerRule)}
    chosen = {key: value for key, value in settings.items() if key in peer_fields}
    return rule_from_dict({"rule": name, "knob": knob, **chosen}, f"rule {name}")


def parse_rule(text: str) -> Pruning:
    """ "caee=0.8" (theta) or "top_p=0.9" (knob) -> a rule with default k_min and compensation."""
    name, sep, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = None
    if not sep or number is None:
        raise ValueError(f"pruning {text!r}: expected RULE=NUMBER, e.g. caee=0.8 or top_p=0.9")
    return rule_from_dict({"rule": name, ("theta" if name == "caee" else "knob"): number}, f"pruning {text!r}")
