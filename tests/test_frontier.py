"""Cuts at matched accuracy (`eval/frontier.py`) on constructed records."""

from __future__ import annotations

import math

import numpy as np
import pytest

from caee_jax.eval import frontier


def record(rule: str, pruned: float, cut: float, drop: float, rise: float, se: float = 0.0, nll_se=None) -> dict:
    """A case whose step cut, relative top-1 drop and perplexity rise are the given fractions; se: the top-1
    drop's interval half-width; nll_se: the mean NLL rise's standard error (None: a record without it)."""
    return dict(
        rule=rule, knob=pruned, batch_size=16, processes=1, pruned_pair_fraction=pruned,
        step_time_s=1 - cut, step_time_unpruned_s=1.0, top1_acc=0.5 * (1 - drop), top1_acc_unpruned=0.5,
        top1_diff_se=0.5 * se / 2, ppl=10 * (1 + rise), ppl_unpruned=10.0,
        predicted_moe_s=1 - cut / 2, predicted_moe_unpruned_s=1.0,
    ) | ({} if nll_se is None else dict(nll_diff_se_windows=nll_se))  # fmt: skip


def test_isotonic_pools_violators():
    np.testing.assert_allclose(frontier.isotonic(np.asarray([0.0, 2.0, 1.0, 3.0])), [0, 1.5, 1.5, 3])
    np.testing.assert_allclose(frontier.isotonic(np.asarray([3.0, 2.0, 1.0])), [2, 2, 2])


def test_cut_is_interpolated_at_the_level_and_none_beyond():
    rows = [record("top_p", 0.1, 0.10, 0.004, 0.01), record("top_p", 0.2, 0.20, 0.008, 0.02)]
    assert frontier.cut_at(rows, frontier.top1_drop, 0.006) == pytest.approx(0.15)
    assert frontier.cut_at(rows, frontier.top1_drop, 0.002) == pytest.approx(0.05)  # from (0, 0)
    assert frontier.cut_at(rows, frontier.top1_drop, 0.01) is None
    assert frontier.both_limits_cut(rows, 0.006, 0.02) == pytest.approx((0.15, False))
    assert frontier.both_limits_cut(rows, 0.5, 0.5) == pytest.approx((0.20, True))  # no limit binds


def test_a_lucky_noisy_point_does_not_stand_for_the_rule():
    """A light point with a large cut (timing noise) is pooled with its neighbours, not taken at face value."""
    rows = [record("r", 0.1, 0.30, 0.002, 0.0), record("r", 0.2, 0.10, 0.004, 0.0), record("r", 0.3, 0.20, 0.02, 0.0)]
    assert frontier.cut_at(rows, frontier.top1_drop, 0.004) == pytest.approx(0.2)


def test_the_interval_reads_the_curve_at_both_ends_of_each_drop():
    rows = [record("r", 0.1, 0.10, 0.005, 0.0, se=0.004), record("r", 0.2, 0.20, 0.010, 0.0, se=0.004)]
    cut, low, high = frontier.interval_cut(rows, frontier.top1_drop, 0.005)  # drops 0.5% and 1%, each +- 0.4%
    assert (cut, low, high) == pytest.approx((0.10, 0.1 * 5 / 9, 0.18))


def test_the_perplexity_interval_carries_the_nll_standard_error_through_exp():
    se = 0.005  # of the mean NLL rise: the rise's interval half-width is (1 + rise) * (exp(2 se) - 1)
    rows = [record("r", 0.1, 0.10, 0.0, 0.01, nll_se=se), record("r", 0.2, 0.20, 0.0, 0.02, nll_se=se)]
    half = 1.02 * math.expm1(2 * se)
    assert frontier.ppl_rise_error(rows[1]) == pytest.approx(half)
    cut, low, high = frontier.interval_cut(rows, frontier.ppl_rise, 0.02)
    assert cut == pytest.approx(0.20) and low < cut and high is None  # the lowered curve stops short of 2%
    first = 0.01 + 1.01 * math.expm1(2 * se)  # the first point's rise at the top of its interval: above 2%
    assert low == pytest.approx(0.10 * 0.02 / first)  # read between (0, 0) and it


def test_matched_table_compares_caee_with_the_best_peer():
    records = [record("caee", p, 2 * p, 0.05 * p, 0.1 * p) for p in (0.05, 0.1, 0.2, 0.3)]
    records += [record("top_p", p, p, 0.05 * p, 0.1 * p) for p in (0.05, 0.1, 0.2, 0.3)]
    text = "\n".join(frontier.matched_table(records))
    assert "Best peer rule under both limits: top_p (20.0%); at ppl rise 2% alone: top_p." in text
    assert "| caee | 2.00x | 2.00x | +10.0 points |" in text
    assert "| ppl rise 1% | ppl rise 2% |" in text  # records without the NLL standard error: no ppl interval


def test_with_nll_standard_errors_the_ratio_at_the_perplexity_limit_has_an_interval():
    records = [record(rule, p, (2 if rule == "caee" else 1) * p, 0.05 * p, 0.1 * p, nll_se=0.0005)
               for rule in ("caee", "top_p") for p in (0.05, 0.1, 0.2, 0.3)]  # fmt: skip
    lines = frontier.matched_table(records)
    assert lines[0].count("[interval]") == 4  # two top-1 levels, two ppl levels
    row = next(line for line in lines if line.startswith("| caee | 2.00x | 2.00x ["))
    low, high = map(float, row.split("2.00x [")[1].split("]")[0].split(", "))
    assert low < 2.0 < high


def test_the_predicted_latency_axis_reads_the_cost_models_cut():
    rows = [record("r", 0.1, 0.10, 0.004, 0.01), record("r", 0.2, 0.20, 0.008, 0.02)]
    assert frontier.cut_at(rows, frontier.ppl_rise, 0.02, latency=frontier.predicted_cut) == pytest.approx(0.10)


def test_without_a_cost_table_only_the_measured_cut_is_shown():
    records = [record("top_p", p, p, 0.05 * p, 0.1 * p) | dict(predicted_moe_s=0.0, predicted_moe_unpruned_s=0.0)
               for p in (0.1, 0.2)]  # fmt: skip
    text = "\n".join(frontier.matched_sections(records))
    assert "measured decode step cut" in text and "predicted" not in text
    figure = frontier.plot_curves(records + [record("caee", 0.1, 0.2, 0.005, 0.01)])  # a run with a table beside
    assert len(figure.axes[0].lines) == 3 and not figure.axes[1].lines  # 2 curves and the limit; none


def test_the_mean_step_axis_is_shown_when_every_record_has_it():
    """The cut of the mean step (time per output token) is a third latency axis, read like the others."""
    records = [record(rule, p, p, 0.05 * p, 0.1 * p) | dict(mean_step_time_s=1 - 2 * p, mean_step_time_unpruned_s=1.0)
               for rule in ("caee", "top_p") for p in (0.1, 0.2)]  # fmt: skip
    assert frontier.cut_at(records[:2], frontier.ppl_rise, 0.02, latency=frontier.mean_step_cut) == pytest.approx(0.4)
    assert "measured mean decode step cut" in "\n".join(frontier.matched_sections(records))
    records[0] = record("caee", 0.1, 0.1, 0.005, 0.01)  # one record measured before the means were kept
    assert "mean decode step" not in "\n".join(frontier.matched_sections(records))


def test_plot_curves_writes_a_png(tmp_path):
    records = [record(rule, p, p * (2 if rule == "caee" else 1), 0.05 * p, 0.1 * p) for p in (0.1, 0.2)
               for rule in ("caee", "top_p")]  # fmt: skip
    path = tmp_path / "curves.png"
    figure = frontier.plot_curves(records, str(path), "test")
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert len(figure.axes[0].lines) >= 2  # one fitted curve per rule
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    (legend,) = figure.legends  # one for both panels, under them: it covers no data
    assert [t.get_text() for t in legend.get_texts()] == ["caee", "top_p"]
    renderer = FigureCanvasAgg(figure).get_renderer()
    legend_top = legend.get_window_extent(renderer).y1
    assert all(legend_top <= ax.get_tightbbox(renderer).y0 for ax in figure.axes)


def test_the_ratio_interval_is_a_lower_bound_where_our_curve_stops_short():
    assert frontier.ratio_text((0.3, 0.28, 0.33), (0.2, 0.18, 0.22), True, 0.33) == "1.50x [1.27, 1.83]"
    assert frontier.ratio_text((0.3, 0.28, None), (0.2, 0.18, 0.22), True, 0.32) == "1.50x [1.27, > 1.78]"
    assert frontier.ratio_text((0.3, 0.28, None), (0.2, 0.18, 0.22), False, 0.32) == "1.50x"
    assert frontier.ratio_text((None, None, None), (0.2, 0.18, 0.22), True, 0.1) == "n/a"
