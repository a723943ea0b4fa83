"""Tables and Pareto plots from one or more sweep directories (`launch/eval.py --out`), per evaluation text.

    python launch/eval_report.py --runs runs/i20-peers-numpy runs/i20-both-numpy --out runs/i20-report

Records of several runs (e.g. the peer rules and each CAEE variant, measured by separate runs) are pooled
per evaluation text (its SHA-256); for each text OUT/NAME.md holds every case, the best cut within the
limits and the cuts at matched accuracy (`caee_jax/eval/frontier.py`), OUT/NAME.png the Pareto plot,
OUT/NAME-curves-pP-bB.png each rule's fitted curve against the perplexity rise (measured and predicted cut).
NAME is the text's file name without extension. Two records of the same case (rule, knob, settings) are
an error naming both files.
"""

from __future__ import annotations

import argparse
import os
import sys

from caee_jax import cli
from caee_jax.eval import frontier, report, results
from caee_jax.eval.user_files import UserFileError, check_writable


def pooled(directories: list[str]) -> dict[str, list[dict]]:
    """Records of every directory's results.jsonl, per evaluation text name."""
    texts, seen, names = {}, {}, {}
    for directory in directories:
        path = os.path.join(directory, "results.jsonl")
        if not os.path.isfile(path):
            raise UserFileError(f"--runs {directory}: no results.jsonl there")
        records, _ = results.read(path, repair=False)
        for record in records:
            provenance = record["provenance"]
            name = os.path.splitext(os.path.basename(provenance["eval_file"]))[0]
            if names.setdefault(name, provenance["eval_sha256"]) != provenance["eval_sha256"]:
                raise UserFileError(f"--runs {directory}: two different texts are named {name}")
            case = (name, *(record.get(field) for field in results.CASE[:4]), report.rule_label(record))
            if case in seen:
                raise UserFileError(f"case {case} is in both {seen[case]} and {path}")
            seen[case] = path
            texts.setdefault(name, []).append(record)
    return texts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="sweep directories (each with results.jsonl)")
    parser.add_argument("--out", required=True, help="directory for NAME.md and NAME.png per text")
    cli.add_debug_flag(parser)
    args = parser.parse_args(argv)
    try:
        check_writable(args.out, "--out", directory=True)
        texts = pooled(args.runs)
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
