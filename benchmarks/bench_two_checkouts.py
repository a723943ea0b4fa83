"""The same jobs from two source trees, alternated: does a change keep the numbers (and how fast it runs)?

Each round runs, from the baseline tree and the candidate tree in alternating order, one greedy
`launch/run.py --json` completion (decode time per token, generated ids) and one `launch/eval.py` case
(teacher-forced decode, pruned against unpruned: step times, top-1 accuracy, perplexity). Each job is a
fresh process whose `caee_jax` comes from its tree (PYTHONPATH), with the venv of this checkout.
Reports per job and tree the median over rounds, the candidate / baseline ratio of medians with a
bootstrap 95% interval over rounds, and whether ids and accuracy figures are identical.

    git worktree add /tmp/base <commit>
    .venv/bin/python benchmarks/bench_two_checkouts.py --base /tmp/base --rounds 5

--job-args adds flags to both jobs, e.g. --job-args "--offload host --cache-experts 0.25".
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

from caee_jax.stats import paired_ratio  # noqa: E402


def run_job(tree: str, argv: list[str]) -> str:
    """stdout of `python <tree>/<argv>` with <tree> first on the import path."""
    env = {**os.environ, "PYTHONPATH": tree}
    result = subprocess.run([sys.executable, *argv], cwd=tree, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{tree}: {' '.join(argv)} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def generate(tree: str, tokens: int, extra: list[str]) -> dict:
    out = json.loads(run_job(tree, ["launch/run.py", "--json", "--max-new-tokens", str(tokens), *extra]))
    return dict(ids=out["generated_ids"], decode_s=out["decode_s_per_token"])


def eval_case(tree: str, batch: int, theta: float, eval_tokens: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out:
        args = ["--rules", "caee", "--knobs", f"caee={theta}", "--batch-sizes", str(batch)]
        run_job(tree, ["launch/eval.py", *args, "--eval-tokens", str(eval_tokens), "--out", out, *extra])
        with open(os.path.join(out, "results.jsonl")) as f:
            record = json.loads(f.readline())
    keys = ("step_time_s", "step_time_unpruned_s", "top1_acc", "ppl", "pruned_pair_fraction")
    return {key: record[key] for key in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="baseline source tree (e.g. a git worktree of main)")
    parser.add_argument("--candidate", default=HERE, help="candidate source tree (default: this checkout)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--theta", type=float, default=0.9)
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--job-args", default="", help="flags added to both jobs (run.py and eval.py)")
    args = parser.parse_args()
    extra = shlex.split(args.job_args)
    trees = {"base": os.path.abspath(args.base), "candidate": os.path.abspath(args.candidate)}
    runs = {name: [] for name in trees}
    for round_ in range(args.rounds):
        order = list(trees) if round_ % 2 == 0 else list(trees)[::-1]
        for name in order:
            result = generate(trees[name], args.new_tokens, extra)
            result |= eval_case(trees[name], args.batch, args.theta, args.eval_tokens, extra)
            runs[name].append(result)
            print(f"round {round_ + 1}/{args.rounds} {name}: {json.dumps(result | {'ids': '...'})}", file=sys.stderr)

    base, cand = runs["base"], runs["candidate"]
    print(f"| metric | base median | candidate median | candidate / base (95% CI over {args.rounds} rounds) |")
    print("|---|---|---|---|")
    for key in ("decode_s", "step_time_s", "step_time_unpruned_s"):
        b, c = (np.array([r[key] for r in rs]) for rs in (base, cand))
        ratio, low, high = paired_ratio(b, c)
        medians = f"{1e3 * np.median(b):.2f} ms | {1e3 * np.median(c):.2f} ms"
        print(f"| {key} | {medians} | {ratio:.3f} [{low:.3f}, {high:.3f}] |")
    for key in ("top1_acc", "ppl", "pruned_pair_fraction"):
        values = {r[key] for r in base + cand}
        print(f"| {key} | {base[0][key]:.6g} | {cand[0][key]:.6g} | {'identical' if len(values) == 1 else 'differs'} |")
    same_ids = all(r["ids"] == base[0]["ids"] for r in base + cand)
    print(f"\ngreedy ids of launch/run.py identical in every run: {same_ids}")


if __name__ == "__main__":
    main()
