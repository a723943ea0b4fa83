"""What storing the routed experts narrower costs in quality: the bundled model with its experts held as
float32, bf16 and fp8 (block-quantised, `routing/storage.py`), compute float32, scored on its held-out
text (`eval/scoring.py`: non-overlapping windows, every token after a window's first predicted).

Prints perplexity and top-1 accuracy per storage, their change against float32, and the share of
positions whose top-1 correctness differs from float32's (a flip either way), with the standard error
of the paired accuracy difference.

    PYTHONPATH=. .venv/bin/python benchmarks/quality_expert_storage.py
"""

from __future__ import annotations

import argparse
import os

import numpy as np

import caee_jax
from caee_jax.api import BUNDLED_MODEL
from caee_jax.eval.scoring import score_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    with open(os.path.join(BUNDLED_MODEL, "heldout.txt"), encoding="utf-8") as f:
        text = f.read()
    scores = {}
    for storage in ("f32", "bf16", "fp8"):
        model = caee_jax.load(weights=storage)
        scores[storage] = score_tokens(model, model.text_ids(text), args.window, args.batch, progress=False)
    base = scores["f32"]
    print(f"held-out text: {len(base.nll)} scored tokens, windows of {args.window}")
    for storage, s in scores.items():
        line = f"{storage:4s} perplexity {s.perplexity:.4f}  top-1 {100 * s.top1_accuracy:.3f}%"
        if storage != "f32":
            paired = s.correct.astype(float) - base.correct.astype(float)
            se = paired.std(ddof=1) / np.sqrt(len(paired))
            line += (
                f"  perplexity {100 * (s.perplexity / base.perplexity - 1):+.3f}%"
                f"  top-1 {100 * paired.mean():+.3f} ± {100 * se:.3f} points"
                f"  correctness flipped at {100 * np.mean(s.correct != base.correct):.3f}% of positions"
                f"  mean |nll change| {np.abs(s.nll - base.nll).mean():.5f} nats"
            )
        print(line, flush=True)


if __name__ == "__main__":
    main()
