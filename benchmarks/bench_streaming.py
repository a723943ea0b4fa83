"""Streaming's cost to the decode loop: `generate_with_stats` with and without run.py's streaming work.

The streamed run detokenizes each new id (`Tokenizer.stream_decoder`) and writes the piece to a file with
a flush, as run.py prints it; the plain run has no `on_step`. Both generate the same fixed number of
tokens (no stop id) from the bundled model at batch 1, alternating within each round. Prints the
medians of the decode seconds per token (the mean of a run's decode steps, which include the callback)
and of the whole call, and their ratios streamed / plain with bootstrap 95% intervals.

    .venv/bin/python benchmarks/bench_streaming.py --rounds 20 --tokens 64
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import caee_jax
from caee_jax.stats import paired_ratio

PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'


def run(model, tokens: int, sink) -> tuple[float, float]:
    """(mean decode step seconds, whole call seconds) of one generation; streamed to `sink` unless None."""
    on_step = None
    if sink is not None:
        decode = model.tokenizer.stream_decoder()

        def on_step(new_ids):
            piece = decode(new_ids[0]) if new_ids[0] is not None else None
            if piece:
                sink.write(piece)
                sink.flush()

    start = time.perf_counter()
    result = caee_jax.generate_with_stats(model, [PROMPT], max_new_tokens=tokens, stop=[], on_step=on_step)
    total = time.perf_counter() - start
    assert len(result.tokens[0]) == tokens
    return float(np.mean(result.decode_step_s)), total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    model = caee_jax.load()
    with open(os.devnull, "w") as sink:
        run(model, args.tokens, None)  # compiles the steps
        run(model, args.tokens, sink)
        times = {"plain": [], "streamed": []}
        for round_ in range(args.rounds):
            order = ("plain", "streamed") if round_ % 2 == 0 else ("streamed", "plain")
            for name in order:
                times[name].append(run(model, args.tokens, sink if name == "streamed" else None))
    step = {name: np.array([t[0] for t in runs]) for name, runs in times.items()}
    whole = {name: np.array([t[1] for t in runs]) for name, runs in times.items()}
    print(f"bundled model, batch 1, {args.tokens} new tokens, {args.rounds} rounds alternated")
    for label, values in (("decode ms/token", step), ("whole call ms", whole)):
        ratio, low, high = paired_ratio(values["plain"], values["streamed"])
        print(
            f"  {label}: plain {1e3 * np.median(values['plain']):.3f}, streamed "
            f"{1e3 * np.median(values['streamed']):.3f}; streamed / plain {ratio:.3f} [{low:.3f}, {high:.3f}]"
        )


if __name__ == "__main__":
    main()
