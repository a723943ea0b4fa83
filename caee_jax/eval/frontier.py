"""Comparing pruning rules at matched accuracy: each rule's cut interpolated on its accuracy-latency curve.

"Best cut within the limits" on a coarse knob grid depends on where the grid points fall, and at 8192
tokens a single point's top-1 drop and step cut are noisy (± 1-2% and ± a few points). Here each rule's
cases (one knob each) become one curve: ordered by their pruned pair fraction (monotone in every rule's
knob), the accuracy loss and the step cut are each fitted by isotonic (non-decreasing) regression, so a
lucky point cannot stand for the rule, and the curve starts at the unpruned model (0 loss, 0 cut). The cut
at accuracy level a is read off it, linearly between points; beyond the rule's heaviest point it is not
extrapolated (None). Top-1 drops and perplexity rises carry a paired interval (± 2 s.e.; `report`): the curve
fitted with every loss at the top (bottom) of its interval gives the low (high) end of the cut's interval at
level a. The area between two rules' curves over [0, a], divided by a, is their mean cut difference there.
The latency axis is the measured decode step cut (`report.step_cut`, of the median step), the cut of the
mean step (`report.mean_step_cut`: the time per output token; where steps are multimodal, as at batch 1
offloaded, the median can jump between modes) or, free of timing noise, the cut of the MoE time the cost
model predicts for the pairs that ran (`predicted_cut`; same table for every rule).
Records as `launch/eval.py` writes them; fractions, not percent.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from caee_jax.eval.report import (
    has_mean_step,
    has_ppl_error,
    legend_below,
    mean_step_cut,
    ppl_rise,
    ppl_rise_error,
    rule_label,
    step_cut,
    top1_drop,
    top1_drop_error,
)

TOP1_LEVELS = (0.005, 0.01)  # relative top-1 drop
PPL_LEVELS = (0.01, 0.02)  # perplexity rise


def isotonic(values: np.ndarray) -> np.ndarray:
    """The non-decreasing sequence closest to `values` in least squares (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, count]
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m1, n1), (m2, n2) = blocks.pop(-2), blocks.pop()
            blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2])
    return np.concatenate([np.full(int(n), m) for m, n in blocks]) if blocks else np.zeros(0)


def predicted_cut(r: dict) -> float:
    """Cut of the predicted MoE time per decode step (cost model; the pairs as run, every rule alike)."""
    return 1 - r["predicted_moe_s"] / r["predicted_moe_unpruned_s"]


def all_predicted(records: list[dict]) -> bool:
    """Whether every record has a predicted MoE time (its run had a cost table: one that swept CAEE)."""
    return all(r["predicted_moe_unpruned_s"] > 0 for r in records)


ERRORS = {top1_drop: top1_drop_error, ppl_rise: ppl_rise_error}  # each accuracy loss's interval half-width


def curve(rows: list[dict], accuracy: Callable[[dict], float], shift: float = 0.0, latency=step_cut):
    """(accuracy loss [P + 1], cut [P + 1]) of the rule's fitted curve from (0, 0), both non-decreasing.
    `shift` moves each point's loss by shift x its interval half-width (`ERRORS`) before fitting; `latency`
    gives a record's cut."""
    rows = sorted((r for r in rows if np.isfinite(accuracy(r))), key=lambda r: r["pruned_pair_fraction"])
    loss = [0.0] + [accuracy(r) + shift * ERRORS[accuracy](r) for r in rows]
    cut = [0.0] + [latency(r) for r in rows]
    return np.maximum.accumulate(isotonic(np.asarray(loss))), isotonic(np.asarray(cut))


def cut_at(rows: list[dict], accuracy, level: float, shift: float = 0.0, latency=step_cut) -> float | None:
    """The curve's cut at accuracy loss `level`: the largest cut at a loss <= level, linearly towards the next
    point; None beyond the curve's last point (the limit never binds on the measured knobs)."""
    xs, ys = curve(rows, accuracy, shift, latency)
    if level > xs[-1]:
        return None
    i = int(np.searchsorted(xs, level, side="right")) - 1
    if i == len(xs) - 1:
        return float(ys[i])
    return float(ys[i] + (ys[i + 1] - ys[i]) * (level - xs[i]) / (xs[i + 1] - xs[i]))


def interval_cut(rows: list[dict], accuracy, level: float, latency=step_cut) -> tuple:
    """(cut, low, high) at accuracy loss `level` (`top1_drop` or `ppl_rise`): the curve as measured, and with
    every loss moved to the top of its interval (low) or the bottom (high); each None beyond the curve."""
    return tuple(cut_at(rows, accuracy, level, shift, latency) for shift in (0.0, 1.0, -1.0))


def both_limits_cut(rows: list[dict], max_drop: float, max_rise: float, latency=step_cut) -> tuple[float, bool]:
    """(cut, bound): the cut at matched accuracy under both limits, the smaller of the curve's cuts at the
    top-1 limit and at the perplexity limit (both losses grow with pruning along a rule's knob). A limit
    the curve never reaches does not bind; when neither does, the heaviest fitted cut, a lower bound
    (bound True)."""
    cuts = [cut_at(rows, top1_drop, max_drop, 0.0, latency), cut_at(rows, ppl_rise, max_rise, 0.0, latency)]
    known = [c for c in cuts if c is not None]
    if known:
        return min(known), False
    return float(curve(rows, ppl_rise, 0.0, latency)[1][-1]), True


def mean_advantage(ours: list[dict], theirs: list[dict], accuracy, level: float, latency=step_cut) -> float | None:
    """Area between the two curves over [0, level] divided by level: our mean cut minus theirs (None when
    either curve stops before `level`)."""
    grid = np.linspace(0.0, level, 101)
    ours_xy, theirs_xy = curve(ours, accuracy, 0.0, latency), curve(theirs, accuracy, 0.0, latency)
    if ours_xy[0][-1] < level or theirs_xy[0][-1] < level:
        return None
    difference = np.interp(grid, *ours_xy) - np.interp(grid, *theirs_xy)
    return float(np.trapezoid(difference, grid) / level)


def matched_table(records: list[dict], max_drop: float = 0.01, max_rise: float = 0.02, latency=step_cut) -> list[str]:
    """Markdown: per rule, the cut read off its curve at each top-1 level (with its interval) and perplexity
    level, and under both limits ("> X%": the level is beyond the rule's heaviest point, X its fitted cut);
    then each CAEE variant against the best peer rule under both limits, at the perplexity limit alone,
    and as the mean cut difference over [0, max_rise] of perplexity rise."""
    header = ["rule"]
    header += [f"top-1 drop {100 * a:g}% [interval]" for a in TOP1_LEVELS]
    ppl_intervals = all(map(has_ppl_error, records))
    header += [f"ppl rise {100 * a:g}%" + (" [interval]" if ppl_intervals else "") for a in PPL_LEVELS]
    header += [f"both limits ({100 * max_drop:g}%, {100 * max_rise:g}%)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    labels = sorted({rule_label(r) for r in records})
    by_rule = {label: [r for r in records if rule_label(r) == label] for label in labels}
    both, at_rise = {}, {}
    heaviest_cut = {label: curve(rows, ppl_rise, 0.0, latency)[1][-1] for label, rows in by_rule.items()}
    for label, rows in by_rule.items():
        heaviest = f"> {100 * heaviest_cut[label]:.1f}%"

        def pct(value, heaviest=heaviest):
            return heaviest if value is None else f"{100 * value:.1f}%"

        cells = [label]
        for accuracy, levels in ((top1_drop, TOP1_LEVELS), (ppl_rise, PPL_LEVELS)):
            for level in levels:
                cut, low, high = interval_cut(rows, accuracy, level, latency)
                shown = accuracy is top1_drop or ppl_intervals
                cells.append(pct(cut) + (f" [{pct(low)}, {pct(high)}]" if shown else ""))
        both[label] = both_limits_cut(rows, max_drop, max_rise, latency)
        at_rise[label] = interval_cut(rows, ppl_rise, max_rise, latency)
        cells.append(("> " if both[label][1] else "") + f"{100 * both[label][0]:.1f}%")
        lines.append("| " + " | ".join(cells) + " |")
    peers = [label for label in labels if not label.startswith("caee")]
    if not peers:
        return lines
    best = max(peers, key=lambda label: both[label][0])  # a lower bound counts in the peer's favour
    best_rise = max(peers, key=lambda label: -1 if at_rise[label][0] is None else at_rise[label][0])
    lines += ["", f"Best peer rule under both limits: {best} ({100 * both[best][0]:.1f}%); at ppl rise "
              f"{100 * max_rise:g}% alone: {best_rise}.", ""]  # fmt: skip
    rise = f"{100 * max_rise:g}%"
    rise_column = f"cut / {best_rise}'s at ppl rise {rise}" + (" [interval]" if ppl_intervals else "")
    lines += [
        f"| CAEE variant | cut / {best}'s, both limits | {rise_column} "
        f"| mean cut difference to {best_rise} over ppl rise [0, {rise}] |",
        "|---|---|---|---|",
    ]
    for label in labels:
        if label.startswith("caee"):
            ratio = f"{both[label][0] / both[best][0]:.2f}x" if both[best][0] > 0 else "n/a"
            rise_ratio = ratio_text(at_rise[label], at_rise[best_rise], ppl_intervals, heaviest_cut[label])
            advantage = mean_advantage(by_rule[label], by_rule[best_rise], ppl_rise, max_rise, latency)
            points = "n/a" if advantage is None else f"{100 * advantage:+.1f} points"
            lines.append(f"| {label} | {ratio} | {rise_ratio} | {points} |")
    return lines


def ratio_text(ours: tuple, theirs: tuple, interval: bool, our_heaviest: float) -> str:
    """'1.42x [1.31, 1.60]': our cut over theirs, each (cut, low, high) as `interval_cut` gives them; with
    `interval`, the ratio's interval: our low over their high, our high over their low (where our curve
    stops short of the level, "> " our heaviest fitted cut over their low: a lower bound; "-" where theirs
    does); "n/a" without both cuts."""
    if ours[0] is None or not theirs[0]:
        return "n/a"
    text = f"{ours[0] / theirs[0]:.2f}x"
    if interval:
        low = f"{ours[1] / theirs[2]:.2f}" if ours[1] is not None and theirs[2] else "-"
        if not theirs[1]:
            high = "-"
        elif ours[2] is None:
            high = f"> {our_heaviest / theirs[1]:.2f}"
        else:
            high = f"{ours[2] / theirs[1]:.2f}"
        text += f" [{low}, {high}]"
    return text


def matched_sections(records: list[dict]) -> list[str]:
    """`matched_table` per (processes, batch) group, on the measured step cut, (when every record has it) the
    mean step's cut and (when the run had a cost table) the predicted MoE-time cut, each under a heading
    line: a `report.write_table` section."""
    lines = []
    for processes, batch in sorted({(r["processes"], r["batch_size"]) for r in records}):
        group = [r for r in records if (r["processes"], r["batch_size"]) == (processes, batch)]
        axes = [(step_cut, "measured decode step cut")]
        if all(map(has_mean_step, group)):
            axes.append((mean_step_cut, "measured mean decode step cut (time per output token)"))
        if all_predicted(group):
            axes.append((predicted_cut, "predicted MoE-time cut"))
        for latency, what in axes:
            lines += ["", f"Cut at matched accuracy, {what}, {processes} process(es), batch {batch} "
                      "(`eval/frontier.py`):", ""]  # fmt: skip
            lines += matched_table(group, latency=latency)
    return lines


def plot_curves(records: list[dict], path: str | None = None, title: str = ""):
    """One batch size's rules: the fitted curves (lines) and the cases (dots), cut against perplexity rise,
    measured step cut (left) and predicted MoE-time cut (right; empty with a note when a record has no
    prediction). Written as a PNG to `path` when given; returns the matplotlib Figure."""
    import matplotlib.pyplot as plt

    from caee_jax.files import atomic_write

    labels = sorted({rule_label(r) for r in records})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, (latency, what) in zip(axes, ((step_cut, "measured decode step cut (%)"),
                                          (predicted_cut, "predicted MoE-time cut (%)")), strict=True):  # fmt: skip
        if latency is predicted_cut and not all_predicted(records):
            ax.text(0.5, 0.5, "no prediction: a run without a cost table", ha="center", transform=ax.transAxes)
            ax.set(xlabel="perplexity rise (%, relative)", ylabel=what, title=title)
            continue
        for i, label in enumerate(labels):
            rows = [r for r in records if rule_label(r) == label]
            color = plt.get_cmap("tab10")(i % 10)
            xs, ys = curve(rows, ppl_rise, 0.0, latency)
            ax.plot(100 * xs, 100 * ys, color=color)
            ax.scatter(
                [100 * ppl_rise(r) for r in rows], [100 * latency(r) for r in rows], s=10, color=color, alpha=0.4
            )
        ax.axvline(100 * PPL_LEVELS[-1], color="grey", lw=0.8, ls="--")
        ax.set(xlabel="perplexity rise (%, relative)", ylabel=what, xlim=(-0.2, 4), title=title)
    fig.tight_layout()
    legend_below(
        fig, [plt.Line2D([], [], color=plt.get_cmap("tab10")(i % 10), label=label) for i, label in enumerate(labels)]
    )
    plt.close(fig)
    if path is not None:
        with atomic_write(path, "wb") as f:
            fig.savefig(f, dpi=110, format="png", bbox_inches="tight")
    return fig
