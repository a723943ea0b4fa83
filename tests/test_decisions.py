"""The per-token CAEE decisions of a prompt (`eval/decisions.py`): the table agrees with what the model ran
and with CAEE's rules, its reasons add up; the plots and the small sweep API draw from real runs."""

from __future__ import annotations

import numpy as np
import pytest
from test_pruning import single_device_table

import caee_jax
from caee_jax.caee.peer_rules import PeerRule
from caee_jax.caee.policy import CAEEConfig
from caee_jax.calibration.costs import Validation
from caee_jax.eval.decisions import HIGH_SCORE, PROTECTED, PRUNED, REASONS, caee_decisions
from caee_jax.eval.decode_eval import sweep
from caee_jax.eval.plots import plot_decisions, plot_validation
from caee_jax.eval.report import plot_pareto

PROMPT = [5, 17, 3, 99, 42, 7, 7, 120, 64, 2, 2, 9, 30]


@pytest.fixture(scope="module")
def tiny():
    model = caee_jax.init_random("tiny")
    return model, single_device_table(model)


def test_decisions_follow_the_rule_and_match_the_model(tiny):
    model, table = tiny
    rule = CAEEConfig(theta=1.0, k_min=1)
    d = caee_decisions(model, PROMPT, rule, table)
    layers, k = model.config.num_moe_layers, model.config.num_experts_per_tok
    assert d.expert.shape == d.kept.shape == d.score.shape == (layers, len(PROMPT), k)
    assert (~d.kept == (d.reason == PRUNED)).all() and (~d.kept).any()
    heaviest = np.argsort(-d.gate_weight, axis=-1)[..., :1]
    assert (np.take_along_axis(d.reason, heaviest, -1) == PROTECTED).all()  # k_min = 1: the heaviest slot
    unprotected = d.reason != PROTECTED
    assert (d.score[unprotected & (d.reason == HIGH_SCORE)] >= 1.0).all()
    assert (d.score[d.reason == PRUNED] < 1.0).all()
    np.testing.assert_allclose(d.importance.sum(-1), k, rtol=1e-5)  # shares of the gate mass, times K
    assert d.expert_counts()[1].sum() == (~d.kept).sum()
    assert (d.device_kept_s <= d.device_s + 1e-12).all()
    summary = d.summary()
    assert sum(summary["reasons"].values()) == d.kept.size and set(summary["reasons"]) == set(REASONS)
    assert len(d.rows()) == d.kept.size and d.rows()[0]["token"] == "<5>"
    assert "CAEE decisions" in d._repr_html_()


def test_theta_zero_prunes_nothing(tiny):
    model, table = tiny
    d = caee_decisions(model, PROMPT, CAEEConfig(theta=0.0), table)
    assert d.kept.all() and d.summary()["pruned"] == 0


def test_decisions_need_caee_and_a_table(tiny):
    model, table = tiny
    with pytest.raises(ValueError, match="needs a CAEEConfig rule and a cost table"):
        caee_decisions(model, PROMPT)
    with pytest.raises(ValueError, match="needs a CAEEConfig"):
        caee_decisions(model, PROMPT, PeerRule("top_p", 0.9), table)


def test_plots_and_the_sweep_api(tiny):
    model, table = tiny
    d = caee_decisions(model, PROMPT, CAEEConfig(theta=1.0), table)
    fig = plot_decisions(d)
    assert len(fig.axes) == model.config.num_moe_layers + 2  # a panel per layer, the share panel, its colorbar
    times = np.array([1e-3, 2e-3, 4e-3])
    fig = plot_validation(Validation(times * 1.1, times, np.array([1, 8, 64])))
    assert "MAPE 10.0%" in fig.axes[0].get_title()
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, 400)
    rules = [CAEEConfig(theta=1.0), PeerRule("top_p", 0.8)]
    records = sweep(model, rules, ids, batch=2, prefix=8, steps_per_window=3, table=table)
    assert [(r["rule"], r["knob"]) for r in records] == [("caee", 1.0), ("top_p", 0.8)]
    assert records[0]["target"] == "floor" and 0 < records[0]["pruned_pair_fraction"] < 1
    assert len(plot_pareto(records).axes) == 2
