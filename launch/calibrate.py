"""Calibrates the cost table of a model on this machine's mesh, or validates the stored one.

    python launch/calibrate.py                                  # bundled model, one device
    python launch/calibrate.py --local-processes 2              # 2 processes, one core each, mesh expert=2
    python launch/calibrate.py --local-processes 2 --slow-process 1:2   # process 1 ~2x slower: its own table
    python launch/calibrate.py --validate --json                # fresh routings: predicted vs measured (mape)
    python launch/calibrate.py --validate --plot docs/figures/cost_validation.png
    python launch/calibrate.py --offload disk --store-dir DIR --cache-experts 0.25   # in-situ miss costs
    python launch/calibrate.py --validate --offload disk --store-dir DIR --cache-experts 0.25 --json

The table goes to configs/cost_tables/<signature>.json (see caee_jax/caee/cost_table.py). Multi-host:
every process runs the same command with --coordinator/--num-processes/--process-id (as launch/run.py);
--local-processes N starts such a cluster on this machine.

With the offload flags of launch/run.py (--offload host|disk, --store-dir, --cache-experts, ...) the stored table
(it must exist: a resident calibration needs every expert on the device) is calibrated in situ for that tier: one
offloaded MoE layer, real store and cache, a cold-ish cache per routing; the time beyond the all-resident prediction
is fitted as a per-miss fetch_s, a per-layer offload_layer_s and a per-reading-layer offload_read_s, written into
the table (its earlier provenance kept, this run's under "offload_<tier>"). With --validate as well, the stored
table is validated instead, on routings of another seed, against the prediction where each miss costs its tier's
fetch_s, each layer its offload_layer_s and a layer that reads its offload_read_s; the summary also reports a fresh
in-situ fit (caee_jax/calibration/offload_validation.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import jax

import caee_jax
from caee_jax import cli
from caee_jax.caee.cost_table import DEFAULT_DIR, CostTableError, save_table
from caee_jax.calibration.costs import ROUNDS, calibrate, validate
from caee_jax.calibration.offload_validation import calibrate_offloaded, validate_offloaded
from caee_jax.calibration.tables import select_table
from caee_jax.cli import positive_int
from caee_jax.config import PRESETS
from caee_jax.eval.user_files import UserFileError, check_writable
from caee_jax.files import atomic_write
from caee_jax.offload import options as offload_options
from caee_jax.parallel import distributed
from caee_jax.routing.storage import Storage


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    source.add_argument("--preset", choices=sorted(PRESETS), help="random-weight preset")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument(
        "--weights",
        choices=Storage.names(),
        help="routed experts' storage (fp8: e4m3 + 128x128 block scales); default: --dtype",
    )
    parser.add_argument("--backend", choices=["loop", "dense", "pallas"], default="loop")
    parser.add_argument("--out", default=DEFAULT_DIR, help="cost table directory")
    parser.add_argument("--scratch-dir", default=".", help="where to time direct disk reads (a real disk)")
    parser.add_argument("--cases-per-size", type=positive_int, default=15, help="calibration routings per batch size")
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=15,
        help="timed runs per routing (the fastest round's median counts)",
    )
    parser.add_argument(
        "--rounds", type=positive_int, default=ROUNDS, help="round-robin rounds the repeats are split into"
    )
    parser.add_argument("--validate", action="store_true", help="validate the stored table (calibrate if none)")
    parser.add_argument("--plot", help="with --validate: write predicted vs measured to this PNG")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    offload_options.add_arguments(parser)
    distributed.add_arguments(parser)
    cli.add_debug_flag(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        offload = _offload(args)
    except UserFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if offload is not None:
        return _offloaded(args, argv, offload)
    if args.local_processes:
        return distributed.relaunch_locally(__file__, argv, args.local_processes, args.slow_process)
    mesh = distributed.join(args)
    lead = jax.process_index() == 0
    if lead:
        try:
            _check_outputs(args)
        except UserFileError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    options = dict(dtype=args.dtype, weights=args.weights, execution=args.backend, mesh=mesh)
    model = caee_jax.init_random(args.preset, **options) if args.preset else caee_jax.load(args.model, **options)

    table = None
    if args.validate:
        try:
            table = select_table(
                model.config, mesh, model.dtype, args.backend, directory=args.out, weights=model.weights
            )
        except CostTableError as error:
            if lead:
                print(f"{error}; calibrating first", file=sys.stderr)
    if table is None:
        table = calibrate(
            model,
            cases_per_size=args.cases_per_size,
            repeats=args.repeats,
            rounds=args.rounds,
            scratch_dir=args.scratch_dir,
        )
        if lead:
            created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
            path = save_table(table, args.out, {"created": created, "command": "launch/calibrate.py " + " ".join(argv)})
            report = dict(table=path, signature=table.signature.__dict__, fit=table.fit.__dict__)
            report["devices"] = [d.__dict__ for d in table.devices]
            if not args.validate:
                _print(report, args.json)
    if not args.validate:
        return 0
    result = validate(model, table, repeats=args.repeats, rounds=args.rounds)
    if lead:
        summary = dict(signature=table.signature.__dict__, **result.summary())
        if args.plot:
            _plot(result, table, args.plot)
            summary["plot"] = args.plot
        _print(summary, args.json)
    return 0


def _offload(args):
    """The offload flags (None without --offload): they calibrate or validate a stored table on one device."""
    try:
        offload = offload_options.from_args(args)
    except ValueError as error:
        raise UserFileError(str(error)) from None
    if offload is None:
        return None
    several = [
        f for f, v in (("--local-processes", args.local_processes), ("--num-processes", args.num_processes)) if v
    ]
    if several or args.mesh:
        raise UserFileError(f"--offload runs on one device; drop {(several or ['--mesh'])[0]}")
    return offload


def _offloaded(args, argv, offload) -> int:
    """--offload: the stored table's in-situ miss costs of the tier calibrated and written (or, with --validate,
    the stored table checked) on one offloaded MoE layer. A missing table is an error: calibrating the
    resident costs needs every expert on the device."""
    distributed.join(args)
    try:
        _check_outputs(args)
        options = dict(dtype=args.dtype, weights=args.weights, execution=args.backend, offload=offload)
        model = caee_jax.init_random(args.preset, **options) if args.preset else caee_jax.load(args.model, **options)
        table = select_table(model.config, None, model.dtype, args.backend, directory=args.out, weights=model.weights)
    except ValueError as error:  # UserFileError, CostTableError, StoreError; a backend offload cannot run
        print(f"error: {error}", file=sys.stderr)
        return 2
    manager = model.execution.offload
    if not args.validate:
        calibrated, timed = calibrate_offloaded(model, table, cases_per_size=args.cases_per_size, repeats=args.repeats)
        path = _save_offload_costs(calibrated, args, argv, timed, manager.slots)
        device = calibrated.devices[0]
        tier = manager.store.tier_index
        report = dict(table=path, tier=timed.tier, slots=manager.slots, cases=len(timed.misses))
        report |= dict(
            fetch_s=device.fetch_s[tier],
            offload_layer_s=device.offload_layer_s[tier],
            offload_read_s=device.offload_read_s[tier],
            replaced_fetch_s=timed.fetch_s,
        )
        _print(report, args.json)
        return 0
    result = validate_offloaded(model, table, repeats=args.repeats)
    summary = dict(signature=table.signature.__dict__, slots=manager.slots, **result.summary())
    if args.plot:
        _plot(result, table, args.plot)
        summary["plot"] = args.plot
    _print(summary, args.json)
    return 0


def _save_offload_costs(table, args, argv, timed, slots: int) -> str:
    """Writes `table` over the stored one, keeping the stored file's provenance and adding this run's under
    "offload_<tier>"; returns the path."""
    path = os.path.join(args.out, table.signature.slug() + ".json")
    with open(path) as f:
        stored = json.load(f)
    provenance = {key: value for key, value in stored.items() if key not in table.to_json()}
    created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    provenance[f"offload_{timed.tier}"] = {
        "created": created,
        "command": "launch/calibrate.py " + " ".join(argv),
        "slots": slots,
        "cases": len(timed.misses),
        "replaced_fetch_s": timed.fetch_s,
    }
    return save_table(table, args.out, provenance)


def _check_outputs(args) -> None:
    """The table directory (written unless --validate finds a table) and the plot are checked before the
    calibration's minutes of timing."""
    if args.plot and not args.validate:
        raise UserFileError("--plot needs --validate")
    check_writable(args.out, "--out", directory=True)
    if args.plot:
        check_writable(args.plot, "--plot")


def _print(report: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report))
        return
    for key, value in report.items():
        print(f"{key}: {value}")


def _plot(result, table, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    points = ax.scatter(1e3 * result.measured_s, 1e3 * result.predicted_s, c=result.num_tokens, cmap="viridis", s=18)
    top = 1.05e3 * max(result.measured_s.max(), result.predicted_s.max())
    ax.plot([0, top], [0, top], color="grey", lw=1)
    ax.set(xlim=(0, top), ylim=(0, top), xlabel="measured MoE layer (ms)", ylabel="predicted (ms)")
    sig = table.signature
    ax.set_title(f"{sig.mesh}, {sig.num_processes} process(es), {sig.backend}: MAPE {100 * result.mape:.1f}%")
    fig.colorbar(points, ax=ax, label="tokens in the batch")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, dpi=110, format="png")


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
