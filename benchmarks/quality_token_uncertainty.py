"""Is a token's uncertainty known before its step, so that CAEE could protect uncertain tokens?

Issue 20 asks about token-level protection of uncertain tokens. At decode step t the one uncertainty
known before the MoE layers run is the previous step's: the entropy H[t-1] of the distribution that
predicted the token now being read. This measures, over windows of a text, how well H[t-1] (and, as an
oracle, the step's own entropy H[t]) sorts tokens by the damage a per-token pruning rule does to them:
KL(unpruned || pruned), top-1 flips and the rise of the true token's NLL, per quartile of the entropy.
The rule is a peer rule (per token, so full-sequence passes make the same decisions as decode steps).

    PYTHONPATH=. .venv/bin/python benchmarks/quality_token_uncertainty.py --text runs/heldout-numpy-480k.txt
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import numpy as np

import caee_jax
from caee_jax.caee.peer_rules import PeerRule


def log_probs(model, ids: np.ndarray, execution, batch: int = 8) -> np.ndarray:
    """ids [B, T] -> next-token log-probabilities [B, T, V] under `execution`."""
    model.execution = execution
    return np.concatenate(
        [np.asarray(jax.nn.log_softmax(model(ids[i : i + batch]), -1)) for i in range(0, len(ids), batch)]
    )


def by_quartile(signal: np.ndarray, damage: np.ndarray) -> str:
    """damage's mean within each quartile of signal, lowest first, and their correlation."""
    edges = np.quantile(signal, [0.25, 0.5, 0.75])
    quartile = np.searchsorted(edges, signal, side="right")
    means = ", ".join(f"{damage[quartile == q].mean():.4f}" for q in range(4))
    return f"[{means}] (corr {np.corrcoef(signal, damage)[0, 1]:+.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", required=True)
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--rule", default="mass_ratio=0.25", help="a per-token peer rule, NAME=KNOB")
    args = parser.parse_args()
    name, _, knob = args.rule.partition("=")
    model = caee_jax.load()
    with open(args.text, encoding="utf-8") as f:
        ids = model.text_ids(f.read())[: args.windows * args.length].reshape(args.windows, args.length)
    unpruned = log_probs(model, ids, model.execution)
    pruned = log_probs(model, ids, dataclasses.replace(model.execution, pruning=PeerRule(name, float(knob))))
    probs = np.exp(unpruned)
    entropy = -(probs * unpruned).sum(-1)  # [B, T]: of the prediction made at t
    kl = (probs * (unpruned - pruned)).sum(-1)
    flip = (unpruned.argmax(-1) != pruned.argmax(-1)).astype(np.float64)
    true = ids[:, 1:, None]
    nll_rise = np.take_along_axis(unpruned[:, :-1] - pruned[:, :-1], true, -1)[..., 0]
    steps = slice(16, args.length - 1)  # past a short prefix; positions with a true next token
    previous = entropy[:, 15 : args.length - 2].ravel()
    current = entropy[:, steps].ravel()
    print(f"{args.windows} windows x {args.length} tokens, rule {args.rule}; damage per entropy quartile, lowest first")
    for label, damage in (("KL", kl[:, steps]), ("top-1 flip", flip[:, steps]), ("NLL rise", nll_rise[:, steps])):
        damage = damage.ravel()
        print(
            f"{label:>10}  by H[t-1]: {by_quartile(previous, damage)}  by H[t] (oracle): {by_quartile(current, damage)}"
        )
    print(f"corr(H[t-1], H[t]) = {np.corrcoef(previous, current)[0, 1]:+.3f}")


if __name__ == "__main__":
    main()
