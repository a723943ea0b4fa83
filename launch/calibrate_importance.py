"""Calibrates CAEE's importance: each routed expert's output-norm factor and each MoE layer's sensitivity.

    python -m checkpoints_tools.stdlib_corpus --split train --chars 1500000 --out runs/stdlib-train.txt
    python launch/calibrate_importance.py --text runs/stdlib-train.txt --out caee_jax/assets/caee-small/importance.npz
    python launch/calibrate_importance.py --model DIR --text FILE --out DIR/importance.npz --tokens 131072
    python launch/calibrate_importance.py --text runs/stdlib-train.txt --sensitivity top1 --out FILE

Runs the model over --text (at least --tokens tokens, in batches of --batch-size windows of --seq-len
tokens): unpruned, then pruning one MoE layer at a time (caee_jax/calibration/importance.py), and writes
the file CAEE's `expert_importance` and `layer_sensitivity` options read (caee_jax/caee/importance.py).
launch/eval.py reads DIR/importance.npz by default. Calibrate on text the evaluation never sees: the
model's heldout.txt (same path or same content) and any text naming one of its held-out files are
refused. Resumable: the sums so far are kept in OUT.partial.npz; a rerun continues, a finished run removes it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import jax

import caee_jax
from caee_jax import cli
from caee_jax.caee import importance
from caee_jax.calibration.importance import calibrate
from caee_jax.eval.user_files import UserFileError, check_writable, read_text
from caee_jax.parallel import distributed


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    parser.add_argument("--text", required=True, help="calibration text (training split, not the evaluation text)")
    parser.add_argument("--out", required=True, help="the .npz file to write")
    parser.add_argument("--tokens", type=int, default=65_536, help="calibration tokens (at least)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per window (each its own sequence)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    parser.add_argument(
        "--sensitivity",
        choices=importance.SensitivityMeasure.names(),
        default="kl",
        help="what a layer's sensitivity counts per unit of pruned gate share: the KL of the next-token "
        "distribution, or the correct top-1 predictions lost (both are measured and stored)",
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--backend", choices=["loop", "dense", "pallas"], default="loop")
    distributed.add_arguments(parser, local_processes=False)
    cli.add_debug_flag(parser)
    return parser.parse_args(argv)


def refuse_evaluation_text(text: str, data: bytes, path: str, model_dir: str) -> None:
    """UserFileError when the text is the model's held-out text, or holds one of its held-out files."""
    heldout = os.path.join(model_dir, "heldout.txt")
    if os.path.isfile(heldout):
        with open(heldout, "rb") as f:
            same = hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()
        if same:
            raise UserFileError(
                f"--text {path}: is the model's held-out evaluation text {heldout}; calibrate on other text"
            )
    training = os.path.join(model_dir, "training.json")
    if os.path.isfile(training):
        with open(training) as f:
            held_out_files = json.load(f).get("heldout_files", [])
        named = next((name for name in held_out_files if f"# file: {name}\n" in text), None)
        if named:
            raise UserFileError(f"--text {path}: holds held-out file {named} (training.json); use the training split")


def _listed(values, digits: int) -> str:
    return ", ".join(f"{value:.{digits}f}" for value in values)


def main(argv=None) -> int:
    args = parse_args(argv)
    model_dir = args.model or caee_jax.api.BUNDLED_MODEL
    try:
        text, data = read_text(args.text, "--text")
        refuse_evaluation_text(text, data, args.text, model_dir)
        check_writable(args.out, "--out")
    except UserFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    mesh = distributed.join(args)
    model = caee_jax.load(args.model, dtype=args.dtype, execution=args.backend, mesh=mesh)
    ids = model.text_ids(text)
    lead = jax.process_index() == 0
    partial = args.out + ".partial.npz"
    try:
        result = calibrate(
            model, ids, tokens=args.tokens, seq_len=args.seq_len, batch_size=args.batch_size,
            text_sha256=hashlib.sha256(data).hexdigest(), sensitivity_measure=args.sensitivity,
            resume_path=partial if lead else None, progress=lead,
        )  # fmt: skip
    except ValueError as error:
        print(f"error: {args.text}: {error}", file=sys.stderr)
        return 2
    if lead:
        importance.save(args.out, result, model.config)
        if os.path.exists(partial):
            os.remove(partial)
        spread = [f"{s.min():.2f}-{s.max():.2f}" for s in result.expert_scale]
        print(
            f"wrote {args.out}: {result.tokens:,} tokens; layer sensitivity ({result.sensitivity_measure}) "
            f"{_listed(result.layer_sensitivity, 2)}; per unit of pruned gate share: KL "
            f"{_listed(result.kl_per_mass, 3)} nats, correct top-1 predictions lost "
            f"{_listed(result.top1_loss_per_mass, 4)}; "
            f"expert factor range per layer {', '.join(spread)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
