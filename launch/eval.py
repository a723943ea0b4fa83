"""Batch evaluation: CAEE and every peer rule, swept over their knobs, against the unpruned model.

    python launch/eval.py                                   # bundled model, its held-out text, one device
    python launch/eval.py --local-processes 2               # the same on 2 processes (expert=2, one core each)
    python launch/eval.py --local-processes 2 --slow-process 1:2   # process 1 ~2x slower (parallel/straggler.py)
    python launch/eval.py --batch-sizes 16 --rules caee,top_p --eval-tokens 1024 --out runs/eval-quick
    python launch/eval.py --compensation mean --out runs/eval-mean   # the model's expert_means.npz

For each (rule, knob, batch size), teacher-forced decoding on held-out text compares the pruned model
with the unpruned one (caee_jax/eval/decode_eval.py): top-1 accuracy, agreement with the unpruned
argmax, perplexity, KL, and decode step times measured alternately in the same run. The step-time cut
(of the median step; the mean step's, the time per output token, is recorded too) gets a bootstrap 95%
interval over the alternated steps; while it is wider than +-(--cut-half-width)
(default 2 points), more windows are timed (no accuracy) up to --max-timed-steps. The table's best cuts
judge the top-1 limit on the drop's paired interval (its upper end) and, beside it, on the point
estimate, and say whether CAEE's and the best peer's cut intervals are apart. One JSON record
per case is appended to OUT/results.jsonl, with its provenance (model, evaluation text, window sizes, dtype,
mesh, cost table, code version; caee_jax/eval/results.py). A rerun skips the cases already there; one whose
provenance differs from the file's is refused (--fresh moves the old file aside and starts a new one).
One run at a time writes to OUT (a second one is refused). OUT/results.md holds the table and
OUT/pareto.png the latency cut against the accuracy drop, one curve per rule.
CAEE uses the stored cost table of this mesh (launch/calibrate.py; --cost-table to pick another,
--cost-table-any-setup to use it although it was calibrated for another setup).
--compensation mean uses calibrated mean expert outputs (launch/calibrate_means.py): --expert-means FILE,
by default the model directory's expert_means.npz. --expert-importance and --layer-sensitivity scale CAEE's
importance by its calibration (launch/calibrate_importance.py): --importance FILE, by default the model
directory's importance.npz; both are on by default when that calibration exists (the bundled model's
does), --no-expert-importance --no-layer-sensitivity give CAEE by gate weight alone. An evaluation text
that is the calibration text (same SHA-256) is refused.
Every calibration file used is printed at the start and is part of the provenance (path and SHA-256).

Offloaded experts (one device): --offload host, or --offload disk --store-dir DIR (written by `python -m
checkpoints_tools.expert_store`), --cache-experts N|FRACTION, --cache-policy, --no-prefetch, as in
launch/run.py. Every rule then runs offloaded; the unpruned and the pruned side each have their own cache
(warmed alike by the same prefill), and each record holds both sides' cache statistics per decode step.
The offload setup is part of the provenance. --price-misses-as disk (with --offload host) prices the host
store's misses as the table's disk tier: the decisions, and so every accuracy figure, are the disk store's,
bit for bit, at host speed; the step times are not (take them from a disk sweep of the same cases with
launch/eval_report.py --timing-from).

EPLB (redundant expert replicas, caee_jax/parallel/replicas.py): with --eplb-slots P (balanced for this
mesh from the routed-token counts of --eplb-loads, default the model's expert_means.npz, measured on
calibration text) or --eplb-placement FILE (launch/plan_eplb.py), the rules `eplb` (the placed model,
nothing pruned: the same predictions, another step time) and `caee+eplb` (CAEE on the placed model,
knob theta) run against the unplaced, unpruned model, side by side with caee and the peer rules:
    python launch/eval.py --rules caee,eplb,caee+eplb --eplb-slots 40 --local-processes 2
Each such case records its placement (slots and fingerprint).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import os
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

import caee_jax
from caee_jax import cli
from caee_jax.caee import expert_means, importance
from caee_jax.caee.compensation import COMPENSATIONS
from caee_jax.caee.cost_table import CostTableError
from caee_jax.caee.peer_rules import PEER_RULES, check_top_k
from caee_jax.caee.policy import TARGETS
from caee_jax.caee.rule_config import rule_of
from caee_jax.calibration.tables import select_table
from caee_jax.cli import positive_int
from caee_jax.config import PRESETS, preset
from caee_jax.eval import frontier, report, results
from caee_jax.eval.decode_eval import Comparison, compare, windows_of
from caee_jax.eval.user_files import UserFileError, check_writable, read_text
from caee_jax.files import LockedError, exclusive_lock
from caee_jax.model.execution import DecisionScope, Execution
from caee_jax.offload import options as offload_options
from caee_jax.offload.cache import Offload
from caee_jax.offload.store import StoreError
from caee_jax.parallel import distributed, eplb_plan, straggler
from caee_jax.parallel.expert_parallel import expert_shards
from caee_jax.parallel.mesh import describe
from caee_jax.routing.storage import Storage

KNOBS = {  # default sweep per rule, from light to heavy pruning
    "caee": (0.4, 0.6, 0.8, 0.9, 1.0, 1.2),
    "topk": (3, 2),
    "top1_ratio": (0.2, 0.3, 0.5, 0.7),
    "mass_ratio": (0.1, 0.15, 0.2, 0.25),
    "top_p": (0.9, 0.8, 0.7, 0.6),
    "capacity": (2.0, 1.5, 1.0, 0.75),
}
EPLB_RULES = ("eplb", "caee+eplb")  # on the model placed with EPLB replicas: unpruned (knob 0), CAEE (theta)


def _positive_list(text: str) -> list[int]:
    values = [positive_int(v) for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r}: no batch sizes")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    source.add_argument("--preset", choices=sorted(PRESETS), help="random-weight preset (smoke tests only)")
    parser.add_argument("--eval-file", help="text to evaluate on (default: the model's heldout.txt)")
    parser.add_argument("--out", default=os.path.join("runs", "eval"), help="results directory")
    parser.add_argument("--fresh", action="store_true", help="move OUT's old results aside and start anew")
    parser.add_argument("--rules", default=",".join(KNOBS), help="comma-separated: caee and peer rules")
    parser.add_argument("--knobs", help="override the sweep, e.g. caee=0.5,1.0;top_p=0.9 (rule=values;...)")
    parser.add_argument("--batch-sizes", type=_positive_list, default="1,16,64")
    parser.add_argument("--prefix", type=positive_int, default=32, help="prefilled tokens per window")
    parser.add_argument("--steps", type=positive_int, default=32, help="teacher-forced decode steps per window")
    parser.add_argument("--eval-tokens", type=positive_int, default=2048, help="predicted tokens per case (at least)")
    parser.add_argument(
        "--cut-half-width", type=float, default=0.02,
        help="time more decode steps until the step-time cut's 95%% interval is this narrow (0.02: +-2 points)",
    )  # fmt: skip
    parser.add_argument(
        "--max-timed-steps", type=positive_int, default=1024,
        help="stop timing more steps at this many (the interval is then reported as it is)",
    )  # fmt: skip
    parser.add_argument("--k-min", type=int, default=1)
    parser.add_argument("--compensation", default="none", choices=COMPENSATIONS)
    parser.add_argument("--expert-means", help="with --compensation mean (default: the model's expert_means.npz)")
    scales = {"expert-importance": "each expert's output-norm factor", "layer-sensitivity": "its layer's sensitivity"}
    for flag, what in scales.items():
        parser.add_argument(
            f"--{flag}",
            action=argparse.BooleanOptionalAction,
            help=f"CAEE: scale importance by {what} (default: on when the model has an importance calibration)",
        )
    parser.add_argument("--importance", help="CAEE's importance calibration (default: the model's importance.npz)")
    parser.add_argument("--slack", type=float, default=0.0)
    parser.add_argument(
        "--cost-exponent",
        type=float,
        default=1.0,
        help="CAEE: score = importance / cost ** this (1: by the cost, 0: cost ignored)",
    )
    parser.add_argument(
        "--per-expert",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="CAEE: score each expert as a whole (its users' summed importance over their summed cost)",
    )
    parser.add_argument("--target", default="floor", choices=TARGETS)
    parser.add_argument(
        "--refill", action=argparse.BooleanOptionalAction, default=True, help="CAEE: restore slots that cost nothing"
    )
    parser.add_argument(
        "--decision-scope",
        default="batch",
        choices=DecisionScope.names(),
        help="data_expert meshes: CAEE and capacity decide over the whole batch (one all-gather per MoE layer) "
        "or over each device's tokens (no collective)",
    )
    parser.add_argument("--cost-table", help="cost table JSON (default: the stored one of this mesh)")
    parser.add_argument(
        "--cost-table-any-setup",
        action="store_true",
        help="use the --cost-table file even if it was calibrated for another setup (mesh, dtype, backend)",
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument(
        "--weights",
        choices=Storage.names(),
        help="routed experts' storage (fp8: e4m3 + 128x128 block scales); default: --dtype",
    )
    offload_options.add_arguments(parser)
    parser.add_argument(
        "--price-misses-as",
        choices=["disk"],
        help="with --offload host: price misses as the disk tier (the disk store's decisions and accuracy; "
        "host step times)",
    )
    eplb_plan.add_arguments(parser)
    distributed.add_arguments(parser)
    cli.add_debug_flag(parser)
    return parser.parse_args(argv)


def sweep(args, top_k: int | None = None) -> list[tuple[str, float]]:
    """(rule, knob) cases in order, each a valid rule (errors name the --rules/--knobs part at fault). With the
    model's top_k: default topk knobs that prune nothing (>= K) are dropped, a given one above K is an error."""
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    unknown = [r for r in rules if r != "caee" and r not in PEER_RULES and r not in EPLB_RULES]
    if unknown:
        names = ", ".join(("caee", *PEER_RULES, *EPLB_RULES))
        raise UserFileError(f"--rules: unknown rule {unknown[0]!r}; rules are {names}")
    placed = args.eplb_slots or args.eplb_placement
    if any(rule in EPLB_RULES for rule in rules) != bool(placed):
        raise UserFileError(
            "the rules eplb and caee+eplb run on a placed model and --eplb-slots / --eplb-placement only place it "
            "for them: give both or neither"
        )
    knobs, given = dict(KNOBS, eplb=(0.0,), **{"caee+eplb": KNOBS["caee"]}), {}
    for part in (args.knobs or "").split(";"):
        if part.strip():
            name, _, values = (p.strip() for p in part.partition("="))
            if name not in rules:
                raise UserFileError(f"--knobs {part!r}: rule {name!r} is not among --rules ({', '.join(rules)})")
            if name == "eplb":
                raise UserFileError(f"--knobs {part!r}: eplb has no knob (its slots: --eplb-slots)")
            try:
                knobs[name] = given[name] = tuple(float(v) for v in values.split(","))
            except ValueError:
                raise UserFileError(f"--knobs {part!r}: expected rule=number,number,...") from None
    cases = []
    for rule in rules:
        for knob in knobs[rule]:
            try:
                pruning = _pruning(rule, knob, args)
                if top_k is not None and rule in given:
                    check_top_k(pruning, top_k)
            except ValueError as error:
                raise UserFileError(f"--knobs {rule}={knob:g}: {error}") from None
            if top_k is None or rule in given or rule != "topk" or knob < top_k:
                cases.append((rule, float(knob)))
    return cases


def _pruning(rule: str, knob: float, args):
    """The pruning rule of a case: `eplb` prunes nothing, `caee+eplb` is CAEE."""
    if rule == "eplb":
        return None
    return rule_of("caee" if rule == "caee+eplb" else rule, knob, **_rule_settings(args))


def _rule_settings(args) -> dict:
    """The rule fields besides the knob that the command line sets."""
    return dict(
        k_min=args.k_min, target=args.target, slack=args.slack, refill=args.refill, compensation=args.compensation,
        expert_importance=args.expert_importance, layer_sensitivity=args.layer_sensitivity,
        cost_exponent=args.cost_exponent, per_expert=args.per_expert,
    )  # fmt: skip


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        offload = _offload(args)
    except UserFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.local_processes:
        return distributed.relaunch_locally(__file__, argv, args.local_processes, args.slow_process)
    try:
        return run(args, offload)
    except (UserFileError, results.ResultsError, LockedError, CostTableError, StoreError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _offload(args) -> Offload | None:
    """The offload flags (None without --offload); offloaded experts run on one device."""
    try:
        offload = offload_options.from_args(args)
    except ValueError as error:
        raise UserFileError(str(error)) from None
    several = [
        f for f, v in (("--local-processes", args.local_processes), ("--num-processes", args.num_processes)) if v
    ]
    if offload is not None and (several or args.mesh):
        raise UserFileError(f"--offload runs on one device; drop {(several or ['--mesh'])[0]}")
    if args.price_misses_as and (offload is None or offload.store != "host"):
        raise UserFileError(
            f"--price-misses-as {args.price_misses_as} prices a host store's misses; add --offload host"
        )
    return offload


def _offload_provenance(model, priced_as: str | None) -> dict | None:
    """The offload setup; with --price-misses-as, the tier the misses were priced as (the step times are the
    store's own, not that tier's)."""
    held = results.offload_provenance(model.execution.offload)
    return held if priced_as is None else dict(held, misses_priced_as=priced_as)


def run(args, offload: Offload | None = None) -> int:
    """The sweep; user mistakes raise the errors `main` reports, as early as they can be found: the rules and
    the output before the model loads, the results file before the first case."""
    _resolve_importance_options(args)
    sweep(args)
    means_path = _means_path(args)
    importance_path = _importance_path(args)
    check_writable(args.out, "--out", directory=True)
    model_dir = args.model or caee_jax.api.BUNDLED_MODEL
    path = args.eval_file or os.path.join(model_dir, "heldout.txt")
    contents = read_text(path, "--eval-file")
    mesh = distributed.join(args)
    lead = jax.process_index() == 0
    with exclusive_lock(args.out) if lead else contextlib.nullcontext():
        return _evaluate(args, mesh, lead, means_path, importance_path, path, contents, offload)


def _evaluate(args, mesh, lead, means_path, importance_path, path, contents, offload) -> int:
    """Loads the model, checks the results file against this run's provenance, runs the missing cases."""
    options = dict(dtype=args.dtype, weights=args.weights, mesh=mesh, offload=offload)
    model = caee_jax.init_random(args.preset, **options) if args.preset else caee_jax.load(args.model, **options)
    stored = Storage.of(model.weights, model.dtype)
    weights = None if stored == Storage.of(None, model.dtype) else stored.value  # None: held in --dtype
    if means_path:
        try:
            expert_means.load_means(model, means_path)
        except expert_means.ExpertMeansError as error:
            raise UserFileError(f"--compensation mean: {error}") from None
    text, data = contents
    if importance_path:
        try:
            calibration = importance.load_importance(model, importance_path)
        except importance.ImportanceError as error:
            raise UserFileError(f"--expert-importance/--layer-sensitivity: {error}") from None
        if calibration.text_sha256 == hashlib.sha256(data).hexdigest():
            raise UserFileError(
                f"--eval-file {path}: is the text {importance_path} was calibrated on; evaluate on other text"
            )
    rules = sweep(args, model.config.num_experts_per_tok)
    ids = model.text_ids(text)
    length = args.prefix + args.steps + 1
    if len(ids) <= length:
        raise UserFileError(f"--eval-file {path}: {len(ids)} tokens; --prefix + --steps needs more than {length}")
    priced = args.eplb_speed_aware or any(rule in ("caee", "caee+eplb") for rule, _ in rules)
    table = _table(args, model, mesh) if priced else None
    if table is not None and args.price_misses_as:
        table = table.priced_as("host", args.price_misses_as)
    placed, eplb_id = _placed(args, mesh, options, model, means_path, importance_path, table)

    provenance = results.provenance(
        model=args.model or args.preset or "bundled caee-small",
        model_dir=None if args.preset else args.model or caee_jax.api.BUNDLED_MODEL,
        preset_config=preset(args.preset) if args.preset else None,
        eval_file=path,
        eval_bytes=data,
        window=dict(
            eval_tokens=args.eval_tokens,
            prefix=args.prefix,
            steps=args.steps,
            dtype=args.dtype,
            weights=weights,
            cut_half_width=args.cut_half_width,
            max_timed_steps=args.max_timed_steps,
        ),  # fmt: skip
        mesh=describe(mesh) if mesh is not None else "one device",
        slowed=straggler.condition() or None,
        cost_table=args.cost_table,
        table=table,
        expert_means=means_path,
        importance=importance_path,
        offload=_offload_provenance(model, args.price_misses_as),
    )
    if lead:
        used = provenance["calibration_files"]
        listed = ", ".join(f"{name} {entry['path']} (sha256 {entry['sha256'][:12]})" for name, entry in used.items())
        print(f"calibration files: {listed or 'none'}")
    settings = {name: getattr(args, name) for name in results.SETTINGS}
    settings["expert_means"] = means_path and os.path.abspath(means_path)
    settings["importance"] = importance_path and os.path.abspath(importance_path)
    processes = jax.process_count()
    cases = [
        dict(rule=rule, knob=knob, batch_size=batch, processes=processes, **settings)
        | dict(eplb=eplb_id if rule in EPLB_RULES else None)
        for batch in args.batch_sizes
        for rule, knob in rules
    ]
    results_path = os.path.join(args.out, "results.jsonl")
    done = _previous(results_path, args.fresh, lead, provenance, cases)
    manager = model.execution.offload
    candidate_manager = None if manager is None else manager.twin()  # the pruned side's own cache
    for case in tqdm(cases, desc="cases", disable=not lead):
        record = dict(case, provenance=provenance)
        if results.key(record) in done:
            continue
        candidate = Execution(
            model.execution.backend,
            pruning=_pruning(case["rule"], case["knob"], args),
            cost_table=table,
            offload=candidate_manager,
            decision_scope=case["decision_scope"],
        )
        runner = dict(candidate_model=placed if case["rule"] in EPLB_RULES else None)
        comparison = Comparison()
        batch = case["batch_size"]
        measured = -(-args.eval_tokens // (batch * args.steps))
        for i in range(measured):
            windows = windows_of(ids, length, batch, seed=1000 * batch + i)
            compare(model, candidate, windows, args.prefix, comparison, table, **runner)
        for i in itertools.count(measured):  # more alternated timing on more windows, for a narrower interval
            if len(comparison.step_s) >= args.max_timed_steps or _cut_is_narrow(comparison, args.cut_half_width):
                break
            windows = windows_of(ids, length, batch, seed=1000 * batch + i)
            compare(model, candidate, windows, args.prefix, comparison, table, timing_only=True, **runner)
        record.update(eval_file=provenance["eval_file"], model=provenance["model"], **comparison.summary())
        if lead:
            results.append(results_path, record)
    if lead:
        records, _ = results.read(results_path, repair=False)
        report.write_table(records, os.path.join(args.out, "results.md"), frontier.matched_sections(records))
        report.plot_pareto(records, os.path.join(args.out, "pareto.png"))
        print(f"{len(records)} cases in {results_path}; table results.md, plot pareto.png")
    return 0


def _placed(args, mesh, options, model, means_path, importance_path, table):
    """(The model again, placed with the EPLB flags' placement and the same calibrations, a label of the
    placement: slots, speed-awareness and fingerprint), or (None, None) without them."""
    if not (args.eplb_slots or args.eplb_placement):
        return None, None
    if options["offload"] is not None:
        raise UserFileError("--eplb-slots/--eplb-placement: offloaded experts have no replicas; drop --offload")
    model_dir = None if args.preset else args.model or caee_jax.api.BUNDLED_MODEL
    shards = 1 if mesh is None else expert_shards(mesh)
    try:
        placement = eplb_plan.from_args(args, model.config, shards, model_dir, table)
    except ValueError as error:
        raise UserFileError(str(error)) from None
    options = dict(options, placement=placement)
    placed = caee_jax.init_random(args.preset, **options) if args.preset else caee_jax.load(args.model, **options)
    if means_path:
        expert_means.load_means(placed, means_path)
    if importance_path:
        importance.load_importance(placed, importance_path)
    tables = (placement.slot_expert, placement.replica_rank, placement.routed_count)
    digest = hashlib.sha256(b"".join(t.tobytes() for t in tables)).hexdigest()
    speed = ", speed-aware" if args.eplb_speed_aware else ""
    return placed, f"{placement.num_slots} slots{speed}, sha256 {digest[:16]}"


def _cut_is_narrow(comparison: Comparison, half_width: float) -> bool:
    """Whether every process's step-cut interval is within +-half_width (all processes decide alike)."""
    _, low, high = comparison.step_cut_interval()
    widest = multihost_utils.process_allgather(np.float32((high - low) / 2))
    return bool(np.max(widest) <= half_width)


def _previous(path: str, fresh: bool, lead: bool, provenance: dict, cases: list[dict]) -> set:
    """The keys of the cases already in the results file, after checking it holds this run's kind of
    records (--fresh: the old file is moved aside instead). Only the lead process writes."""
    if fresh:
        aside = results.move_aside(path) if lead else None
        if aside:
            print(f"moved the old results to {aside}", file=sys.stderr)
        return set()
    records, note = results.read(path, repair=lead)
    if note and lead:
        print(f"warning: {note}", file=sys.stderr)
    results.check(path, records, provenance, cases)
    return {results.key(r) for r in records}


def _table(args, model, mesh):
    """The cost table for CAEE; a setup mismatch error names the flag that accepts it anyway."""
    if args.cost_table_any_setup and not args.cost_table:
        raise UserFileError("--cost-table-any-setup needs --cost-table FILE")
    backend, override = model.execution.backend, args.cost_table_any_setup
    return select_table(
        model.config, mesh, model.dtype, backend, args.cost_table, override=override, weights=model.weights
    )


def _resolve_importance_options(args) -> None:
    """--expert-importance / --layer-sensitivity not given: on when CAEE is swept and an importance calibration
    is at hand (--importance, or the model directory's importance.npz), as measured in docs/RESULTS.md
    (issue 20); else off."""
    caee = bool({"caee", "caee+eplb"} & {r.strip() for r in args.rules.split(",")})
    available = bool(args.importance) or (
        not args.preset and os.path.isfile(importance.default_path(args.model or caee_jax.api.BUNDLED_MODEL))
    )
    for name in ("expert_importance", "layer_sensitivity"):
        if getattr(args, name) is None:
            setattr(args, name, caee and available)


def _importance_path(args) -> str | None:
    """The importance calibration that --expert-importance / --layer-sensitivity use (None without them)."""
    if not (args.expert_importance or args.layer_sensitivity):
        if args.importance:
            raise UserFileError("--importance is only used with --expert-importance or --layer-sensitivity")
        return None
    if args.preset and not args.importance:
        raise UserFileError("--expert-importance/--layer-sensitivity with --preset need --importance FILE")
    return args.importance or importance.default_path(args.model or caee_jax.api.BUNDLED_MODEL)


def _means_path(args) -> str | None:
    """The expert-means file that --compensation mean uses (None for the other modes)."""
    if args.compensation != "mean":
        if args.expert_means:
            raise UserFileError("--expert-means is only used with --compensation mean")
        return None
    if args.preset and not args.expert_means:
        raise UserFileError("--compensation mean with --preset needs --expert-means FILE")
    return args.expert_means or expert_means.default_path(args.model or caee_jax.api.BUNDLED_MODEL)


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
