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
from caee_jax.caee.cost_table import CostTableError
from caee_jax.caee.peer_rules import PEER_RULES
from caee_jax.caee.policy import TARGETS
from caee_jax.caee.rule_config import rule_of
from caee_jax.calibration.tables import select_table
from caee_jax.eval import report
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
    rules = sweep(args, model.config.num_experts_per_tok)
    table = None
    if any(rule == "caee" for rule, _ in rules):
        try:
            table = select_table(model.config, mesh, model.dtype, model.execution.backend, args.cost_table)
        except CostTableError as error:
            raise SystemExit(f"error: {error}") from None
    rule_settings = dict(k_min=args.k_min, target=args.target, slack=args.slack, refill=args.refill)
    rule_settings["compensation"] = args.compensation

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
        pruning = rule_of(rule, knob, **rule_settings)
        candidate = Execution(model.execution.backend, pruning=pruning, cost_table=table)
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
        report.write_table(records, os.path.join(args.out, "results.md"))
        report.plot_pareto(records, os.path.join(args.out, "pareto.png"))
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


if __name__ == "__main__":
    sys.exit(main())
