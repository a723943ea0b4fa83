"""Calibrates the per-expert mean outputs that `mean` compensation adds for pruned slots.

    python -m checkpoints_tools.stdlib_corpus --split train --chars 1500000 --out runs/stdlib-train.txt
    python launch/calibrate_means.py --text runs/stdlib-train.txt --out caee_jax/assets/caee-small/expert_means.npz
    python launch/calibrate_means.py --model DIR --text FILE --out DIR/expert_means.npz --tokens 1000000

Runs the unpruned model over --text (at least --tokens tokens, in batches of --batch-size windows of
--seq-len tokens) and writes each MoE layer's per-expert mean output and routed-token count to --out
(caee_jax/caee/expert_means.py). launch/eval.py and launch/run.py read DIR/expert_means.npz by default.
Calibrate on text the evaluation never sees: the model's heldout.txt is refused.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

import caee_jax
from caee_jax import cli
from caee_jax.caee import expert_means
from caee_jax.calibration.expert_means import calibrate
from caee_jax.eval.user_files import UserFileError, check_writable, read_text
from caee_jax.parallel import distributed


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    parser.add_argument("--text", required=True, help="calibration text (not the evaluation text)")
    parser.add_argument("--out", required=True, help="the .npz file to write")
    parser.add_argument("--tokens", type=int, default=262_144, help="calibration tokens (at least)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per window (each its own sequence)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--backend", choices=["loop", "dense", "pallas"], default="loop")
    distributed.add_arguments(parser, local_processes=False)
    cli.add_debug_flag(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    model_dir = args.model or caee_jax.api.BUNDLED_MODEL
    heldout = os.path.join(model_dir, "heldout.txt")
    if not os.path.isfile(args.text):
        print(f"error: {args.text}: no such text file", file=sys.stderr)
        return 2
    if os.path.exists(heldout) and os.path.samefile(args.text, heldout):
        print(f"error: {args.text} is the model's held-out evaluation text; calibrate on other text", file=sys.stderr)
        return 2
    try:
        text, _ = read_text(args.text, "--text")
        check_writable(args.out, "--out")
    except UserFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    mesh = distributed.join(args)
    model = caee_jax.load(args.model, dtype=args.dtype, execution=args.backend, mesh=mesh)
    ids = model.text_ids(text)
    try:
        result = calibrate(
            model, ids, tokens=args.tokens, seq_len=args.seq_len, batch_size=args.batch_size, progress=True
        )
    except ValueError as error:
        print(f"error: {args.text}: {error}", file=sys.stderr)
        return 2
    if jax.process_index() == 0:
        expert_means.save(args.out, result, model.config)
        unused = int((result.counts == 0).sum())
        print(
            f"wrote {args.out}: {result.tokens:,} tokens, {result.means.shape[0]} MoE layers x "
            f"{result.means.shape[1]} experts; routed tokens per expert min {result.counts.min():,}, "
            f"max {result.counts.max():,}; {unused} expert(s) never routed (zero mean)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
