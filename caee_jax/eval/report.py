"""Ranking and showing a sweep's records (one dict per (rule, knob, batch) case, `launch/eval.py`): the
latency cut against the accuracy drop, the best cut within accuracy limits per rule, CAEE against the
best peer rule, a Markdown table and a Pareto plot."""

from __future__ import annotations

import math
import os
import textwrap

from caee_jax.caee.importance import FILENAME as IMPORTANCE_FILE
from caee_jax.files import atomic_write


def step_cut(r: dict) -> float:
    return 1 - r["step_time_s"] / r["step_time_unpruned_s"]


def step_cut_interval(r: dict) -> tuple[float, float] | None:
    """The step cut's bootstrap 95% interval (low, high); None for a record measured before it was kept."""
    interval = r.get("step_cut_interval")
    return tuple(interval) if interval else None


def _percent(cut: float, interval) -> str:
    """'12.3% [10.1, 14.2]': a cut and its interval (low, high; None: none), in percent."""
    return f"{100 * cut:.1f}%" + (f" [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]" if interval else "")


def cut_text(r: dict) -> str:
    """'12.3% [10.1, 14.2]': the step cut and its interval, in percent."""
    return _percent(step_cut(r), step_cut_interval(r))


def has_mean_step(r: dict) -> bool:
    """Whether the record holds its mean step times (records measured before they were kept do not)."""
    return "mean_step_time_s" in r


def mean_step_cut(r: dict) -> float:
    """The cut of the mean decode step (the time per output token), of a record that has it (`has_mean_step`)."""
    return 1 - r["mean_step_time_s"] / r["mean_step_time_unpruned_s"]


def mean_cut_text(r: dict) -> str:
    """'12.3% [10.1, 14.2]': the mean step's cut and its interval, in percent ("-" without it)."""
    return _percent(mean_step_cut(r), r["mean_step_cut_interval"]) if has_mean_step(r) else "-"


def top1_drop(r: dict) -> float:
    """Relative; NaN when the unpruned model hit no token (nothing to drop from: not within any limit)."""
    return 1 - _ratio(r["top1_acc"], r["top1_acc_unpruned"])


def top1_drop_error(r: dict) -> float:
    """Two standard errors of the relative top-1 drop, paired over the same tokens, a window's tokens counted
    as one draw (records measured before that was kept: each token as one draw, within 0.96-1.08x of it on
    the bundled model at 32 tokens per window)."""
    return 2 * _ratio(r.get("top1_diff_se_windows", r["top1_diff_se"]), r["top1_acc_unpruned"])


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def ppl_rise(r: dict) -> float:
    return r["ppl"] / r["ppl_unpruned"] - 1


def has_ppl_error(r: dict) -> bool:
    """Whether the record holds its NLL rise's standard error (records measured before it was kept do not)."""
    return "nll_diff_se_windows" in r


def ppl_rise_error(r: dict) -> float:
    """Two standard errors of the perplexity rise, paired over the same tokens, a window's tokens counted as
    one draw: the rise is exp(mean NLL rise) - 1, so 2 s.e. of the mean NLL rise carried through exp (the
    upper side's, the wider); 0 for a record without it (`has_ppl_error`)."""
    return (1 + ppl_rise(r)) * math.expm1(2 * r["nll_diff_se_windows"]) if has_ppl_error(r) else 0.0


def rule_label(r: dict) -> str:
    """The rule, with the settings that differ from the defaults, and the importance file CAEE's options read
    when it is not the checkpoint's own `importance.npz`."""
    defaults = dict(compensation="none", k_min=1, decision_scope="batch")
    if r["rule"] == "caee":
        defaults.update(
            target="floor", slack=0.0, refill=True, expert_importance=False, layer_sensitivity=False,
            cost_exponent=1.0, per_expert=False,
        )  # fmt: skip
    changed = [f"{name}={r.get(name)}" for name, value in defaults.items() if r.get(name, value) != value]
    calibration = os.path.basename(r.get("importance") or "")
    calibrated = r["rule"] == "caee" and (r.get("expert_importance") or r.get("layer_sensitivity"))
    if calibrated and calibration not in ("", IMPORTANCE_FILE):  # a file other than the checkpoint's own
        changed.append(f"importance={calibration}")
    return r["rule"] + (f" ({', '.join(changed)})" if changed else "")


MAX_DROP, MAX_RISE = 0.01, 0.02  # the accuracy limits of the targets (relative top-1 drop, ppl rise)
MIN_PEER_CUT = 0.01  # below this the best peer's cut is within timing noise: no ratio is given


def best_within(rows: list[dict], max_drop: float, max_rise: float, settled: bool = False) -> dict | None:
    """The case with the largest step cut among those within both accuracy limits; settled: the top-1 drop
    judged by the upper end of its paired interval (+2 s.e.), not by its point estimate."""
    within = [r for r in rows if top1_drop(r) + settled * top1_drop_error(r) <= max_drop and ppl_rise(r) <= max_rise]
    return max(within, key=step_cut, default=None)


def _apart(ours: dict, theirs: dict) -> str:
    """Whether two cases' step-cut intervals are disjoint ("apart") or not ("overlap"); "" without them."""
    a, b = step_cut_interval(ours), step_cut_interval(theirs)
    return "" if not (a and b) else " (apart)" if a[0] > b[1] or b[0] > a[1] else " (overlap)"


def best_table(records: list[dict]) -> list[str]:
    """Per (processes, batch) and rule: the best cut (with its 95% interval) within the targets' limits, the
    top-1 drop judged by its interval's upper end and by its point estimate, and within perplexity limits
    alone; then CAEE's best against the best peer's (n/a when the best peer cuts less than MIN_PEER_CUT),
    saying whether the two cuts' intervals are apart."""
    limits = ((MAX_DROP, MAX_RISE, True), (MAX_DROP, MAX_RISE, False), (1.0, 0.01, False), (1.0, MAX_RISE, False))
    header = ("processes", "batch", "rule", "top-1 drop + 2 s.e. <= 1%, ppl rise <= 2%")
    header += ("top-1 drop (point) <= 1%, ppl rise <= 2%", "ppl rise <= 1%", "ppl rise <= 2%")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for processes, batch in sorted({(r["processes"], r["batch_size"]) for r in records}):
        group = [r for r in records if (r["processes"], r["batch_size"]) == (processes, batch)]
        best = {}
        for label in sorted({rule_label(r) for r in group}):
            rows = [r for r in group if rule_label(r) == label]
            best[label] = [best_within(rows, *limit) for limit in limits]
            cells = [f"{cut_text(b)} (knob {b['knob']:g})" if b else "none" for b in best[label]]
            lines.append("| " + " | ".join(map(str, (processes, batch, label, *cells))) + " |")
        peers = [cuts for label, cuts in best.items() if not label.startswith("caee")]
        for label, cuts in best.items():
            if label.startswith("caee") and peers:
                ratios = []
                for i, b in enumerate(cuts):
                    peer = max((p[i] for p in peers if p[i]), key=step_cut, default=None)
                    meaningful = b and peer is not None and step_cut(peer) >= MIN_PEER_CUT
                    ratios.append(f"{step_cut(b) / step_cut(peer):.2f}x{_apart(b, peer)}" if meaningful else "n/a")
                lines.append("| " + " | ".join(map(str, (processes, batch, f"{label} / best peer", *ratios))) + " |")
    return lines


def offload_cells(r: dict) -> tuple[str, str]:
    """An offloaded case's blocking fetches per decode step and cache hit rate, unpruned -> pruned ("-" for a
    case with every expert on the device)."""
    if "offload" not in r:
        return "-", "-"
    base, pruned = r["offload"]["unpruned"], r["offload"]["pruned"]
    blocking = f"{base['blocking_fetches']:.2f} -> {pruned['blocking_fetches']:.2f}"
    return blocking, f"{100 * base['hit_rate']:.1f}% -> {100 * pruned['hit_rate']:.1f}%"


def write_table(records: list[dict], path: str, sections: list[str] = ()) -> None:
    """The Markdown table of every case, then `best_table`, then `sections` (more Markdown lines, e.g.
    `frontier.matched_sections`); offloaded cases add their cache columns, records with mean step times
    the mean step's cut."""
    offloaded, means = any("offload" in r for r in records), any(map(has_mean_step, records))
    header = ("processes", "batch", "rule", "knob", "pruned pairs", "step cut [95% interval]")
    header += ("mean step cut [95% interval]",) if means else ()
    header += ("top-1 drop (rel.) ± 2 s.e.",)
    header += ("ppl rise (rel.) ± 2 s.e.", "agreement", "KL")
    header += ("blocking fetches / step", "hit rate") if offloaded else ()
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in sorted(records, key=lambda r: (r["processes"], r["batch_size"], rule_label(r), r["knob"])):
        cells = (
            r["processes"],
            r["batch_size"],
            rule_label(r),
            f"{r['knob']:g}",
            f"{100 * r['pruned_pair_fraction']:.1f}%",
        )
        cells += (cut_text(r),) + ((mean_cut_text(r),) if means else ())
        cells += (f"{100 * top1_drop(r):.2f} ± {100 * top1_drop_error(r):.2f}%",)
        rise = f"{100 * ppl_rise(r):.2f}" + (f" ± {100 * ppl_rise_error(r):.2f}" if has_ppl_error(r) else "")
        cells += (f"{rise}%", f"{100 * r['agreement']:.1f}%", f"{r['kl']:.4f}")
        cells += offload_cells(r) if offloaded else ()
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += ["", "Best decode step-time cut within accuracy limits (relative to the unpruned model):", ""]
    lines += best_table(records)
    lines += list(sections)
    with atomic_write(path) as f:
        f.write("\n".join(lines) + "\n")


def plot_pareto(records: list[dict], path: str | None = None):
    """Per (processes, batch): step-time cut against the top-1 drop (with 2 s.e. bars), and against the
    perplexity rise; one curve per rule, points in order of pruned pairs; dashed: the targets' limits.
    Written as a PNG to `path` when given; returns the matplotlib Figure (a notebook displays it)."""
    import matplotlib.pyplot as plt

    groups = sorted({(r["processes"], r["batch_size"]) for r in records})
    labels = sorted({rule_label(r) for r in records})
    colors = {label: plt.get_cmap("tab10")(i % 10) for i, label in enumerate(labels)}  # one color per rule
    fig, axes = plt.subplots(2, len(groups), figsize=(4.5 * len(groups), 8.5), squeeze=False)
    for column, (processes, batch) in enumerate(groups):
        top, bottom = axes[0][column], axes[1][column]
        for label in labels:
            rows = [r for r in records if (r["processes"], r["batch_size"], rule_label(r)) == (processes, batch, label)]
            rows.sort(key=lambda r: r["pruned_pair_fraction"])
            if rows:
                cut = [100 * step_cut(r) for r in rows]
                top.errorbar(
                    [100 * top1_drop(r) for r in rows], cut, xerr=[100 * top1_drop_error(r) for r in rows],
                    marker="o", ms=4, capsize=2, color=colors[label], alpha=0.85,
                )  # fmt: skip
                bottom.plot([100 * ppl_rise(r) for r in rows], cut, marker="o", ms=4, color=colors[label])
        top.axvline(100 * MAX_DROP, color="grey", lw=0.8, ls="--")
        bottom.axvline(100 * MAX_RISE, color="grey", lw=0.8, ls="--")
        top.set(title=f"{processes} process(es), batch {batch}", xlabel="top-1 accuracy drop (%, relative)")
        bottom.set(xlabel="perplexity rise (%, relative)")
        for ax in (top, bottom):
            ax.set_ylabel("decode step time cut (%)")
    fig.tight_layout()
    legend_below(fig, [plt.Line2D([], [], color=colors[label], marker="o", label=label) for label in labels])
    plt.close(fig)  # not shown twice by pyplot's own display; the returned figure is
    if path is not None:
        with atomic_write(path, "wb") as f:
            fig.savefig(f, dpi=110, format="png", bbox_inches="tight")
    return fig


def legend_below(fig, handles) -> None:
    """The figure's legend under its axes, one rule per line (long labels wrapped), so that it neither runs
    off the figure nor covers data; saved whole with `savefig(..., bbox_inches="tight")`."""
    for handle in handles:
        handle.set_label(textwrap.fill(handle.get_label(), 100, break_on_hyphens=False))
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=1, fontsize=8, frameon=False)
