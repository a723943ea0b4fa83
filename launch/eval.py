"""Batch evaluation: CAEE and every peer rule, swept over their knobs, against the unpruned model.

    python launch/eval.py                                   # bundled model, its held-out text, one device
    python launch/eval.py --local-processes 2               # the same on 2 processes (expert=2, one core each)
    python launch/eval.py --batch-sizes 16 --rules caee,top_p --eval-tokens 1024 --out runs/eval-quick
    python launch/eval.py --compensation mean --out runs/eval-mean   # the model's expert_means.npz

For each (rule, knob, batch size), teacher-forced decoding on held-out text compares the pruned model
with the unpruned one (caee_jax/eval/decode_eval.py): top-1 accuracy, agreement with the unpruned
argmax, perplexity, KL, and decode step times measured alternately in the same run. One JSON record
per case is appended to OUT/results.jsonl (a rerun skips cases already there); OUT/results.md holds
the table and OUT/pareto.png the latency cut against the accuracy drop, one curve per rule.
CAEE uses the stored cost table of this mesh (launch/calibrate.py; --cost-table to pick another).
--compensation mean uses calibrated mean expert outputs (launch/calibrate_means.py): --expert-means FILE,
by default the model directory's expert_means.npz.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
from tqdm import tqdm

import caee_jax
from caee_jax.caee import expert_means
from caee_jax.caee.compensation import COMPENSATIONS
from caee_jax.caee.cost_table import CostTableError, load_table, signature_of, table_for
from caee_jax.caee.peer_rules import PEER_RULES, PeerRule
from caee_jax.caee.policy import TARGETS, CAEEConfig
from caee_jax.eval.decode_eval import Comparison, compare, windows_of
from caee_jax.model.execution import Execution
from caee_jax.parallel import distributed

# Recorded per case, and part of what identifies it (target, slack, refill: CAEE's; expert_means: the file)
SETTINGS = ("compensation", "k_min", "target", "slack", "refill", "expert_means")
KNOBS = {  # default sweep per rule, from light to heavy pruning
    "caee": (0.4, 0.6, 0.8, 0.9, 1.0, 1.2),
    "topk": (3, 2),
    "top1_ratio": (0.2, 0.3, 0.5, 0.7),
    "mass_ratio": (0.1, 0.15, 0.2, 0.25),
    "top_p": (0.9, 0.8, 0.7, 0.6),
    "capacity": (2.0, 1.5, 1.0, 0.75),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    source.add_argument("--preset", help="random-weight preset (smoke tests only)")
    parser.add_argument("--eval-file", help="text to evaluate on (default: the model's heldout.txt)")
    parser.add_argument("--out", default=os.path.join("runs", "eval"), help="results directory")
    parser.add_argument("--rules", default=",".join(KNOBS), help="comma-separated: caee and peer rules")
    parser.add_argument("--knobs", help="override the sweep, e.g. caee=0.5,1.0;top_p=0.9 (rule=values;...)")
    parser.add_argument("--batch-sizes", default="1,16,64")
    parser.add_argument("--prefix", type=int, default=32, help="prefilled tokens per window")
    parser.add_argument("--steps", type=int, default=32, help="teacher-forced decode steps per window")
    parser.add_argument("--eval-tokens", type=int, default=2048, help="predicted tokens per case (at least)")
    parser.add_argument("--k-min", type=int, default=1)
    parser.add_argument("--compensation", default="none", choices=COMPENSATIONS)
    parser.add_argument("--expert-means", help="with --compensation mean (default: the model's expert_means.npz)")
    parser.add_argument("--slack", type=float, default=0.0)
    parser.add_argument("--target", default="floor", choices=TARGETS)
    parser.add_argument(
        "--refill", action=argparse.BooleanOptionalAction, default=True, help="CAEE: restore slots that cost nothing"
    )
    parser.add_argument("--cost-table", help="cost table JSON (default: the stored one of this mesh)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    distributed.add_arguments(parser)
    return parser.parse_args(argv)


def sweep(args, top_k: int) -> list[tuple[str, float]]:
    """(rule, knob) cases in order."""
    knobs = dict(KNOBS)
    for part in (args.knobs or "").split(";"):
        if part.strip():
            name, _, values = part.partition("=")
            try:
                knobs[name.strip()] = tuple(float(v) for v in values.split(","))
            except ValueError:
                raise SystemExit(f"error: --knobs {part!r}: expected rule=number,number,...") from None
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    unknown = [r for r in rules if r != "caee" and r not in PEER_RULES]
    if unknown:
        raise SystemExit(f"error: unknown rule {unknown[0]!r}; rules are caee, {', '.join(PEER_RULES)}")
    return [(rule, float(knob)) for rule in rules for knob in knobs[rule] if rule != "topk" or knob < top_k]


def rule_of(args, rule: str, knob: float):
    if rule == "caee":
        return CAEEConfig(
            theta=knob,
            k_min=args.k_min,
            target=args.target,
            slack=args.slack,
            refill=args.refill,
            compensation=args.compensation,
        )
    return PeerRule(rule, knob, k_min=args.k_min, compensation=args.compensation)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.local_processes:
        return distributed.relaunch_locally(__file__, argv, args.local_processes)
    means_path = _means_path(args)
    mesh = distributed.join(args)
    options = dict(dtype=args.dtype, mesh=mesh)
    model = caee_jax.init_random(args.preset, **options) if args.preset else caee_jax.load(args.model, **options)
    lead = jax.process_index() == 0
    if means_path:
        try:
            expert_means.load_means(model, means_path)
        except expert_means.ExpertMeansError as error:
            raise SystemExit(f"error: --compensation mean: {error}") from None

    path = args.eval_file or os.path.join(args.model or caee_jax.api.BUNDLED_MODEL, "heldout.txt")
    with open(path) as f:
        text = f.read()
    ids = model.text_ids(text)
    signature = signature_of(model.config, mesh, model.dtype, model.execution.backend)
    rules = sweep(args, model.config.num_experts_per_tok)
    table = None
    if any(rule == "caee" for rule, _ in rules):
        try:
            table = load_table(args.cost_table, signature) if args.cost_table else table_for(signature)
        except CostTableError as error:
            raise SystemExit(f"error: {error}") from None

    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "results.jsonl")
    done = _finished(results_path)
    processes = jax.process_count()
    cases = [(rule, knob, batch) for batch in _ints(args.batch_sizes) for rule, knob in rules]
    length = args.prefix + args.steps + 1
    settings = {name: getattr(args, name) for name in SETTINGS}
    settings["expert_means"] = means_path and os.path.abspath(means_path)
    for rule, knob, batch in tqdm(cases, desc="cases", disable=not lead):
        if _key(dict(rule=rule, knob=knob, batch_size=batch, processes=processes, **settings)) in done:
            continue
        candidate = Execution(model.execution.backend, pruning=rule_of(args, rule, knob), cost_table=table)
        comparison = Comparison()
        batches = -(-args.eval_tokens // (batch * args.steps))
        for i in range(batches):
            windows = windows_of(ids, length, batch, seed=1000 * batch + i)
            compare(model, candidate, windows, args.prefix, comparison, table)
        record = dict(
            rule=rule,
            knob=knob,
            batch_size=batch,
            processes=processes,
            **settings,
            eval_file=os.path.abspath(path),
            model=args.model or args.preset or "bundled caee-small",
            **comparison.summary(),
        )
        if lead:
            _append(results_path, record)
    if lead:
        records = [json.loads(line) for line in open(results_path)]
        _write_table(records, os.path.join(args.out, "results.md"))
        _plot(records, os.path.join(args.out, "pareto.png"))
        print(f"{len(records)} cases in {results_path}; table results.md, plot pareto.png")
    return 0


def _means_path(args) -> str | None:
    """The expert-means file that --compensation mean uses (None for the other modes)."""
    if args.compensation != "mean":
        if args.expert_means:
            raise SystemExit("error: --expert-means is only used with --compensation mean")
        return None
    if args.preset and not args.expert_means:
        raise SystemExit("error: --compensation mean with --preset needs --expert-means FILE")
    return args.expert_means or expert_means.default_path(args.model or caee_jax.api.BUNDLED_MODEL)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _key(record: dict) -> tuple:
    """What identifies a case: rule, knob, batch size, processes and the settings."""
    return tuple(record.get(name) for name in ("rule", "knob", "batch_size", "processes", *SETTINGS))


def _finished(path: str) -> set:
    if not os.path.exists(path):
        return set()
    return {_key(json.loads(line)) for line in open(path)}


def _append(path: str, record: dict) -> None:
    """One line per case, flushed and fsynced: a killed run loses at most the case in progress."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _cut(r: dict) -> float:
    return 1 - r["step_time_s"] / r["step_time_unpruned_s"]


def _drop(r: dict) -> float:
    return 1 - r["top1_acc"] / r["top1_acc_unpruned"]


def _drop_error(r: dict) -> float:
    """Two standard errors of the relative top-1 drop (paired over the same tokens)."""
    return 2 * r["top1_diff_se"] / r["top1_acc_unpruned"]


def _rise(r: dict) -> float:
    return r["ppl"] / r["ppl_unpruned"] - 1


def _label(r: dict) -> str:
    """The rule, with the settings that differ from the defaults."""
    defaults = dict(compensation="none", k_min=1)
    if r["rule"] == "caee":
        defaults.update(target="floor", slack=0.0, refill=True)
    changed = [f"{name}={r.get(name)}" for name, value in defaults.items() if r.get(name, value) != value]
    return r["rule"] + (f" ({', '.join(changed)})" if changed else "")


MAX_DROP, MAX_RISE = 0.01, 0.02  # the accuracy limits of the targets (relative top-1 drop, ppl rise)
MIN_PEER_CUT = 0.01  # below this the best peer's cut is within timing noise: no ratio is given


def _best(rows: list[dict], max_drop: float, max_rise: float) -> dict | None:
    """The case with the largest step cut among those within both accuracy limits."""
    within = [r for r in rows if _drop(r) <= max_drop and _rise(r) <= max_rise]
    return max(within, key=_cut, default=None)


def _best_table(records: list[dict]) -> list[str]:
    """Per (processes, batch) and rule: the best cut within the targets' limits, and within perplexity
    limits alone (top-1 accuracy is the noisier measure); then CAEE's best against the best peer's (n/a
    when the best peer cuts less than MIN_PEER_CUT)."""
    limits = ((MAX_DROP, MAX_RISE), (1.0, 0.01), (1.0, MAX_RISE))
    header = ("processes", "batch", "rule", "top-1 drop <= 1%, ppl rise <= 2%", "ppl rise <= 1%", "ppl rise <= 2%")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for processes, batch in sorted({(r["processes"], r["batch_size"]) for r in records}):
        group = [r for r in records if (r["processes"], r["batch_size"]) == (processes, batch)]
        best = {}
        for label in sorted({_label(r) for r in group}):
            rows = [r for r in group if _label(r) == label]
            best[label] = [_best(rows, *limit) for limit in limits]
            cells = [f"{100 * _cut(b):.1f}% (knob {b['knob']:g})" if b else "none" for b in best[label]]
            lines.append("| " + " | ".join(map(str, (processes, batch, label, *cells))) + " |")
        peers = [cuts for label, cuts in best.items() if not label.startswith("caee")]
        for label, cuts in best.items():
            if label.startswith("caee") and peers:
                ratios = []
                for i, b in enumerate(cuts):
                    peer = max((_cut(p[i]) for p in peers if p[i]), default=None)
                    meaningful = b and peer is not None and peer >= MIN_PEER_CUT
                    ratios.append(f"{_cut(b) / peer:.2f}x" if meaningful else "n/a")
                lines.append("| " + " | ".join(map(str, (processes, batch, f"{label} / best peer", *ratios))) + " |")
    return lines


def _write_table(records: list[dict], path: str) -> None:
    header = ("processes", "batch", "rule", "knob", "pruned pairs", "step cut", "top-1 drop (rel.) ± 2 s.e.")
    header += ("ppl rise (rel.)", "agreement", "KL")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in sorted(records, key=lambda r: (r["processes"], r["batch_size"], _label(r), r["knob"])):
        cells = (
            r["processes"],
            r["batch_size"],
            _label(r),
            f"{r['knob']:g}",
            f"{100 * r['pruned_pair_fraction']:.1f}%",
        )
        cells += (f"{100 * _cut(r):.1f}%", f"{100 * _drop(r):.2f} ± {100 * _drop_error(r):.2f}%")
        cells += (f"{100 * _rise(r):.2f}%", f"{100 * r['agreement']:.1f}%", f"{r['kl']:.4f}")
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += ["", "Best decode step-time cut within accuracy limits (relative to the unpruned model):", ""]
    lines += _best_table(records)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


def _plot(records: list[dict], path: str) -> None:
    """Per (processes, batch): step-time cut against the top-1 drop (with 2 s.e. bars), and against the
    perplexity rise; one curve per rule, points in order of pruned pairs; dashed: the targets' limits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["processes"], r["batch_size"]) for r in records})
    labels = sorted({_label(r) for r in records})
    colors = {label: plt.get_cmap("tab10")(i % 10) for i, label in enumerate(labels)}  # one color per rule
    fig, axes = plt.subplots(2, len(groups), figsize=(4.5 * len(groups), 8.5), squeeze=False)
    for column, (processes, batch) in enumerate(groups):
        top, bottom = axes[0][column], axes[1][column]
        for label in labels:
            rows = [r for r in records if (r["processes"], r["batch_size"], _label(r)) == (processes, batch, label)]
            rows.sort(key=lambda r: r["pruned_pair_fraction"])
            if rows:
                cut = [100 * _cut(r) for r in rows]
                top.errorbar(
                    [100 * _drop(r) for r in rows], cut, xerr=[100 * _drop_error(r) for r in rows],
                    marker="o", ms=4, capsize=2, color=colors[label], alpha=0.85,
                )  # fmt: skip
                bottom.plot([100 * _rise(r) for r in rows], cut, marker="o", ms=4, color=colors[label])
        top.axvline(100 * MAX_DROP, color="grey", lw=0.8, ls="--")
        bottom.axvline(100 * MAX_RISE, color="grey", lw=0.8, ls="--")
        top.set(title=f"{processes} process(es), batch {batch}", xlabel="top-1 accuracy drop (%, relative)")
        bottom.set(xlabel="perplexity rise (%, relative)")
        for ax in (top, bottom):
            ax.set_ylabel("decode step time cut (%)")
    handles = [plt.Line2D([], [], color=colors[label], marker="o", label=label) for label in labels]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(labels), 6), fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
