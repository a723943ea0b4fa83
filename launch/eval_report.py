"""Tables and Pareto plots from one or more sweep directories (`launch/eval.py --out`), per evaluation text.

    python launch/eval_report.py --runs runs/i20-peers-numpy runs/i20-both-numpy --out runs/i20-report

Records of several runs (e.g. the peer rules and each CAEE variant, measured by separate runs) are pooled
per evaluation text (its SHA-256); for each text OUT/NAME.md holds every case, the best cut within the
limits and the cuts at matched accuracy (`caee_jax/eval/frontier.py`), OUT/NAME.png the Pareto plot,
OUT/NAME-curves-pP-bB.png each rule's fitted curve against the perplexity rise (measured and predicted cut).
NAME is the text's file name without extension. Two records of the same case (rule, knob, settings) are
an error naming both files. CAEE cases calibrated by byte-identical importance files (same SHA-256) are one
rule, named after the model's own `importance.npz` when one of them is.

--timing-from DIR...: each case's step times (measured and predicted) and offload statistics from the same
case (text, rule, knob, settings, batch, processes) in these sweeps, its accuracy from --runs. For cases
whose decisions do not depend on where they ran, so that accuracy is measured on many tokens where steps are
cheap and timing where the deployment runs: e.g. CAEE on a host store priced as the disk tier
(`launch/eval.py --offload host --price-misses-as disk`: same residency, same prices, same decisions, bit for
bit) or a peer rule on resident experts (it ignores residency), timed on the disk store. A case without a
timing case is an error.
"""

from __future__ import annotations

import argparse
import os
import sys

from caee_jax import cli
from caee_jax.caee.importance import FILENAME as IMPORTANCE_FILE
from caee_jax.eval import frontier, report, results
from caee_jax.eval.user_files import UserFileError, check_writable

TIMING = (  # what --timing-from takes from the timing sweep: measured and predicted times, offload statistics
    "step_time_s", "step_time_unpruned_s", "step_cut_interval", "timed_steps", "offload",
    "mean_step_time_s", "mean_step_time_unpruned_s", "mean_step_cut_interval",
    "predicted_moe_s", "predicted_moe_unpruned_s", "predicted_device_s", "predicted_device_unpruned_s",
)  # fmt: skip


def case_of(name: str, record: dict) -> tuple:
    """A case's identity within the pooled records of text `name`."""
    return (name, *(record.get(field) for field in results.CASE[:4]), report.rule_label(record))


def read_sweeps(directories: list[str]) -> list[tuple[str, dict]]:
    """(path, record) of every directory's results.jsonl."""
    found = []
    for directory in directories:
        path = os.path.join(directory, "results.jsonl")
        if not os.path.isfile(path):
            raise UserFileError(f"--runs {directory}: no results.jsonl there")
        found += [(path, record) for record in results.read(path, repair=False)[0]]
    return found


def one_name_per_calibration(records: list[dict]) -> None:
    """Names every importance file of the same content (SHA-256 in the provenance) alike, in place: the
    model's own `importance.npz` when one of them is, else the first seen; so that copies label and pool as
    one rule (`report.rule_label` names a file other than the model's own)."""
    paths = {}
    for record in records:
        sha, path = record["provenance"].get("importance_sha256"), record.get("importance")
        if sha:  # recorded only with its file's path
            paths.setdefault(sha, []).append(path)
    name = {
        sha: next((p for p in same if os.path.basename(p) == IMPORTANCE_FILE), same[0]) for sha, same in paths.items()
    }
    for record in records:
        sha = record["provenance"].get("importance_sha256")
        if sha in name:
            record["importance"] = name[sha]


def pooled(found: list[tuple[str, dict]]) -> dict[str, list[dict]]:
    """The records of `read_sweeps`, per evaluation text name."""
    texts, seen, names = {}, {}, {}
    for path, record in found:
        provenance = record["provenance"]
        name = os.path.splitext(os.path.basename(provenance["eval_file"]))[0]
        if names.setdefault(name, provenance["eval_sha256"]) != provenance["eval_sha256"]:
            raise UserFileError(f"{os.path.dirname(path)}: two different texts are named {name}")
        case = case_of(name, record)
        if case in seen:
            raise UserFileError(f"case {case} is in both {seen[case]} and {path}")
        seen[case] = path
        texts.setdefault(name, []).append(record)
    return texts


def timed_elsewhere(texts: dict[str, list[dict]], timing: dict[str, list[dict]]) -> None:
    """Replaces each record's TIMING fields by those of its case in `timing` (pooled records), in place; the
    record's provenance names where they came from (`timing_from`: that case's eval_tokens and code)."""
    cases = {case_of(name, r): r for name, records in timing.items() for r in records}
    for name, records in texts.items():
        for record in records:
            timed = cases.get(case_of(name, record))
            if timed is None:
                raise UserFileError(f"--timing-from: no timing of case {case_of(name, record)}")
            if timed["provenance"]["eval_sha256"] != record["provenance"]["eval_sha256"]:
                raise UserFileError(f"--timing-from: case {case_of(name, record)} was timed on another text")
            for field in TIMING:  # a field the timing case lacks (an older record) is not left from the accuracy run
                if field in timed:
                    record[field] = timed[field]
                else:
                    record.pop(field, None)
            held = timed["provenance"]
            record["provenance"] = dict(
                record["provenance"], timing_from=dict(eval_tokens=held["eval_tokens"], code=held["code"])
            )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="sweep directories (each with results.jsonl)")
    parser.add_argument("--out", required=True, help="directory for NAME.md and NAME.png per text")
    parser.add_argument("--timing-from", nargs="+", help="sweep directories that time the same cases (see above)")
    cli.add_debug_flag(parser)
    args = parser.parse_args(argv)
    try:
        check_writable(args.out, "--out", directory=True)
        runs, timing = read_sweeps(args.runs), read_sweeps(args.timing_from or [])
        one_name_per_calibration([record for _, record in runs + timing])
        texts = pooled(runs)
        if timing:
            timed_elsewhere(texts, pooled(timing))
    except (UserFileError, results.ResultsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for name, records in sorted(texts.items()):
        report.write_table(records, os.path.join(args.out, f"{name}.md"), frontier.matched_sections(records))
        report.plot_pareto(records, os.path.join(args.out, f"{name}.png"))
        for processes, batch in sorted({(r["processes"], r["batch_size"]) for r in records}):
            group = [r for r in records if (r["processes"], r["batch_size"]) == (processes, batch)]
            figure = os.path.join(args.out, f"{name}-curves-p{processes}-b{batch}.png")
            frontier.plot_curves(group, figure, f"{name}, {processes} process(es), batch {batch}")
        print(f"{name}: {len(records)} cases -> {args.out}/{name}.md, {name}.png, {name}-curves-*.png")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
