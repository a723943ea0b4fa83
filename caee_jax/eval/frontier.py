"""Comparing pruning rules at matched accuracy: each rule's cut interpolated on its accuracy-latency curve.

"Best cut within the limits" on a coarse knob grid depends on where the grid points fall, and at 8192
tokens a single point's top-1 drop and step cut are noisy (± 1-2% and ± a few points). Here each rule's
cases (one knob each) become one curve: ordered by their pruned pair fraction (monotone in every rule's
knob), the accuracy loss and the step cut are each fitted by isotonic (non-decreasing) regression, so a
lucky point cannot stand for the rule, and the curve starts at the unpruned model (0 loss, 0 cut). The cut
at accuracy level a is read off it, linearly between points; beyond the rule's heaviest point it is not
extrapolated (None). Top-1 drops carry a paired interval (± 2 s.e.): the curve fitted with every drop at
the top (bottom) of its interval gives the low (high) end of the cut's interval at level a. The area
between two rules' curves over [0, a], divided by a, is their mean cut difference there.
Records as `launch/eval.py` writes them; fractions, not percent.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from caee_jax.eval.report import ppl_rise, rule_label, step_cut, top1_drop, top1_drop_error

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


def curve(rows: list[dict], accuracy: Callable[[dict], float], shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(accuracy loss [P + 1], cut [P + 1]) of the rule's fitted curve from (0, 0), both non-decreasing.
    `shift` moves each point's loss by shift x its top-1 interval half-width before fitting."""
    rows = sorted((r for r in rows if np.isfinite(accuracy(r))), key=lambda r: r["pruned_pair_fraction"])
    loss = [0.0] + [accuracy(r) + shift * top1_drop_error(r) for r in rows]
    cut = [0.0] + [step_cut(r) for r in rows]
    return np.maximum.accumulate(isotonic(np.asarray(loss))), isotonic(np.asarray(cut))


def cut_at(rows: list[dict], accuracy: Callable[[dict], float], level: float, shift: float = 0.0) -> float | None:
    """The curve's cut at accuracy loss `level`: the largest cut at a loss <= level, linearly towards the next
    point; None beyond the curve's last point (the limit never binds on the measured knobs)."""
    xs, ys = curve(rows, accuracy, shift)
    if level > xs[-1]:
        return None
    i = int(np.searchsorted(xs, level, side="right")) - 1
    if i == len(xs) - 1:
        return float(ys[i])
    return float(ys[i] + (ys[i + 1] - ys[i]) * (level - xs[i]) / (xs[i + 1] - xs[i]))


def top1_cut(rows: list[dict], level: float) -> tuple[float | None, float | None, float | None]:
    """(cut, low, high) at a relative top-1 drop of `level`: the curve as measured, and with every drop
    moved to the top of its interval (low) or the bottom (high)."""
    return tuple(cut_at(rows, top1_drop, level, shift) for shift in (0.0, 1.0, -1.0))


def both_limits_cut(rows: list[dict], max_drop: float, max_rise: float) -> float | None:
    """The cut at matched accuracy under both limits: the smaller of the curves' cuts at the top-1 limit
    and at the perplexity limit (both losses grow with pruning along a rule's knob); a limit the curve
    never reaches does not bind."""
    cuts = [cut_at(rows, top1_drop, max_drop), cut_at(rows, ppl_rise, max_rise)]
    known = [c for c in cuts if c is not None]
    return min(known) if known else None  # None: neither limit binds on the measured knobs


def mean_advantage(
    ours: list[dict], theirs: list[dict], accuracy: Callable[[dict], float], level: float
) -> float | None:
    """Area between the two curves over [0, level] divided by level: our mean cut minus theirs (None when
    either curve stops before `level`)."""
    grid = np.linspace(0.0, level, 101)
    ours_xy, theirs_xy = curve(ours, accuracy), curve(theirs, accuracy)
    if ours_xy[0][-1] < level or theirs_xy[0][-1] < level:
        return None
    difference = np.interp(grid, *ours_xy) - np.interp(grid, *theirs_xy)
    return float(np.trapezoid(difference, grid) / level)


def _pct(value: float | None, rows: list[dict] = ()) -> str:
    """A cut in percent; None: "> X%" with the rule's heaviest fitted cut X (the level is never reached)."""
    if value is None:
        return f"> {100 * curve(rows, ppl_rise)[1][-1]:.1f}%" if rows else "n/a"
    return f"{100 * value:.1f}%"


def matched_table(records: list[dict], max_drop: float = 0.01, max_rise: float = 0.02) -> list[str]:
    """Markdown: per rule, the interpolated cut at each top-1 level (with its interval) and perplexity level,
    the cut under both limits; then each CAEE variant against the best peer rule under both limits and the
    mean cut advantage over [0, 2%] perplexity rise ("> X%": the rule's heaviest point stays below that
    loss; X its fitted cut)."""
    header = ["rule"]
    header += [f"top-1 drop {100 * a:g}% [interval]" for a in TOP1_LEVELS]
    header += [f"ppl rise {100 * a:g}%" for a in PPL_LEVELS]
    header += [f"both limits ({100 * max_drop:g}%, {100 * max_rise:g}%)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    by_rule = {
        label: [r for r in records if rule_label(r) == label] for label in sorted({rule_label(r) for r in records})
    }
    both = {}
    for label, rows in by_rule.items():
        cells = [label]
        for level in TOP1_LEVELS:
            cut, low, high = top1_cut(rows, level)
            cells.append(f"{_pct(cut, rows)} [{_pct(low, rows)}, {_pct(high, rows)}]")
        cells += [_pct(cut_at(rows, ppl_rise, level), rows) for level in PPL_LEVELS]
        both[label] = both_limits_cut(rows, max_drop, max_rise)
        cells.append(_pct(both[label], rows))
        lines.append("| " + " | ".join(cells) + " |")
    # A peer whose limits never bind counts with its heaviest fitted cut (a lower bound: in its favour).
    peers = {
        label: curve(by_rule[label], ppl_rise)[1][-1] if cut is None else cut
        for label, cut in both.items()
        if not label.startswith("caee")
    }
    if peers:
        best_peer = max(peers, key=peers.get)
        lines += ["", f"Best peer rule under both limits: {best_peer} ({_pct(peers[best_peer])}).", ""]
        lines += ["| CAEE variant | cut / best peer's, both limits | mean cut advantage over ppl rise [0, 2%] |"]
        lines += ["|---|---|---|"]
        for label, cut in both.items():
            if label.startswith("caee"):
                ratio = f"{cut / peers[best_peer]:.2f}x" if cut is not None and peers[best_peer] > 0 else "n/a"
                advantage = mean_advantage(by_rule[label], by_rule[best_peer], ppl_rise, max_rise)
                points = "n/a" if advantage is None else f"{100 * advantage:+.1f} points"
                lines.append(f"| {label} | {ratio} | {points} |")
    return lines


def matched_sections(records: list[dict]) -> list[str]:
    """`matched_table` per (processes, batch) group, each under a heading line: a `report.write_table` section."""
    lines = []
    for processes, batch in sorted({(r["processes"], r["batch_size"]) for r in records}):
        group = [r for r in records if (r["processes"], r["batch_size"]) == (processes, batch)]
        lines += ["", f"Cut at matched accuracy, {processes} process(es), batch {batch} (`eval/frontier.py`):", ""]
        lines += matched_table(group)
    return lines
