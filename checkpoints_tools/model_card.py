"""Measure the bundled model and write its model card.

    python -m checkpoints_tools.model_card [--model caee_jax/assets/caee-small] [--out docs/MODEL_CARD.md]

On every held-out file of the corpus split: perplexity and top-1 accuracy of the model against
unigram and bigram baselines counted on the training files; per-layer expert load (max / mean
tokens per expert); how gate mass spreads over a token's top-k. Also records the perplexity of a
small fixed slice of the bundled `heldout.txt`, which the test suite re-measures.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

import caee_jax
from caee_jax.eval.scoring import expert_load, gate_rank_profile, score_tokens
from checkpoints_tools import stdlib_corpus

SLICE_TOKENS = 1024  # the slice of heldout.txt the tests re-score
SLICE_WINDOW = 256


def encode_stream(tokenizer, texts: list[str]) -> np.ndarray:
    """BOS + tokens + EOS per text, concatenated (the training layout)."""
    eos = tokenizer.eos_ids[0]
    return np.concatenate([np.array([*tokenizer.encode(t), eos], np.int64) for t in texts])


def ngram_baselines(train: np.ndarray, heldout: np.ndarray, vocab: int) -> dict:
    """Add-one unigram, and bigram with Dirichlet smoothing towards the unigram (alpha picked on the
    held-out set, which flatters the baseline)."""
    unigram = (np.bincount(train, minlength=vocab) + 1.0) / (len(train) + vocab)
    pairs = np.bincount(train[:-1] * vocab + train[1:], minlength=vocab * vocab).reshape(vocab, vocab)
    context = pairs.sum(1)
    prev, nxt = heldout[:-1], heldout[1:]
    best = None
    for alpha in (0.1, 1.0, 10.0, 100.0, 1000.0):
        p = (pairs[prev, nxt] + alpha * unigram[nxt]) / (context[prev] + alpha)
        ppl = float(np.exp(-np.log(p).mean()))
        if best is None or ppl < best[0]:
            best = (ppl, alpha)
    bigram_top1 = np.where(context[prev] > 0, pairs[prev].argmax(1), unigram.argmax()) == nxt
    return {
        "unigram": {
            "ppl": float(np.exp(-np.log(unigram[nxt]).mean())),
            "top1_acc": float((nxt == unigram.argmax()).mean()),
        },
        "bigram": {"ppl": best[0], "top1_acc": float(bigram_top1.mean()), "alpha": best[1]},
    }


def slice_perplexity(model, directory: str) -> float:
    """Perplexity of the first SLICE_TOKENS + 1 tokens of the bundled heldout.txt."""
    with open(os.path.join(directory, "heldout.txt")) as f:
        ids = np.array(model.tokenizer.encode(f.read()), np.int64)[: SLICE_TOKENS + 1]
    return score_tokens(model, ids, window=SLICE_WINDOW, batch=4, progress=False).perplexity


def measure(directory: str) -> dict:
    model = caee_jax.load(directory)
    train_files, heldout_files = stdlib_corpus.split_files()
    heldout = encode_stream(model.tokenizer, [stdlib_corpus.read_text(f) for f in heldout_files])
    scores = score_tokens(model, heldout, window=512, batch=8)
    scored = heldout[1 : 1 + len(scores.nll)]
    train = encode_stream(model.tokenizer, [stdlib_corpus.read_text(f) for f in train_files])
    load = expert_load(scores.topk_ids, model.config.n_routed_experts)
    profile = gate_rank_profile(scores.topk_weights)
    first_moe = model.config.first_k_dense_replace
    return {
        "heldout_files": len(heldout_files),
        "heldout_tokens_scored": int(len(scored)),
        "train_tokens": int(len(train)),
        "model": {"ppl": scores.perplexity, "top1_acc": scores.top1_accuracy},
        **ngram_baselines(train, heldout, model.config.vocab_size),
        "expert_load": [
            {
                "layer": first_moe + i,
                "max_over_mean": float(row.max() / row.mean()),
                "min_over_mean": float(row.min() / row.mean()),
            }
            for i, row in enumerate(load)
        ],
        "gate_rank_share": [
            {"layer": first_moe + i, "shares": [float(s) for s in row]} for i, row in enumerate(profile)
        ],
        "slice": {"tokens": SLICE_TOKENS, "window": SLICE_WINDOW, "ppl": slice_perplexity(model, directory)},
        "config": model.config.to_hf(),
    }


def render(figures: dict, directory: str) -> str:
    c = figures["config"]
    lines = [
        "# Model card: caee-small",
        "",
        "A DeepSeek-V3-architecture model trained on this machine from the Python standard library source",
        f"(`python -m checkpoints_tools.train_small`), bundled at `{directory}` and loaded by `caee_jax.load()`.",
        "",
        "## Architecture",
        "",
        f"- {c['num_hidden_layers']} layers ({c['first_k_dense_replace']} dense-MLP, "
        f"{c['num_hidden_layers'] - c['first_k_dense_replace']} MoE), hidden {c['hidden_size']}, "
        f"{c['num_attention_heads']} MLA heads (q_lora {c['q_lora_rank']}, kv_lora {c['kv_lora_rank']}, "
        f"rope {c['qk_rope_head_dim']}), vocab {c['vocab_size']} (byte-level BPE)",
        f"- MoE: {c['n_routed_experts']} routed experts of {c['hidden_size']} x {c['moe_intermediate_size']}, "
        f"top-{c['num_experts_per_tok']}, {c['n_group']} groups (top {c['topk_group']}), "
        f"{c['n_shared_experts']} shared expert, sigmoid router with `e_score_correction_bias`, "
        f"routed_scaling_factor {c['routed_scaling_factor']}",
        "- Trained with DeepSeek-V3's auxiliary-loss-free balancing "
        "(bias nudged by the sign of each expert's load error).",
        "",
        f"## Held-out evaluation ({figures['heldout_files']} held-out stdlib files, "
        f"{figures['heldout_tokens_scored']:,} tokens scored in 512-token windows)",
        "",
        "| predictor | perplexity | top-1 accuracy |",
        "|---|---|---|",
        f"| caee-small | {figures['model']['ppl']:.2f} | {100 * figures['model']['top1_acc']:.1f}% |",
        f"| bigram (Dirichlet alpha={figures['bigram']['alpha']:g}, counted on "
        f"{figures['train_tokens']:,} training tokens) | {figures['bigram']['ppl']:.2f} | "
        f"{100 * figures['bigram']['top1_acc']:.1f}% |",
        f"| unigram (add-one) | {figures['unigram']['ppl']:.2f} | {100 * figures['unigram']['top1_acc']:.1f}% |",
        "",
        "## Routing on held-out text",
        "",
        "| MoE layer | expert load max / mean | min / mean | gate share of ranks 1..k |",
        "|---|---|---|---|",
    ]
    for load, share in zip(figures["expert_load"], figures["gate_rank_share"], strict=True):
        shares = " / ".join(f"{s:.2f}" for s in share["shares"])
        lines.append(f"| {load['layer']} | {load['max_over_mean']:.2f} | {load['min_over_mean']:.2f} | {shares} |")
    s = figures["slice"]
    lines += [
        "",
        "Gate share of rank r: mean over tokens of the r-th largest routed weight over the sum of the top-k.",
        "An even split would be 1/k each; one expert taking everything would be 1.",
        "",
        f"Test slice: the first {s['tokens']} tokens of `heldout.txt` in {s['window']}-token windows: "
        f"perplexity {s['ppl']:.4f} (re-measured by `tests/test_bundled_model.py`).",
        "",
        "Reproduce: `.venv/bin/python -m checkpoints_tools.model_card` (writes this file and `model_card.json`).",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=caee_jax.api.BUNDLED_MODEL)
    parser.add_argument("--out", default=os.path.join("docs", "MODEL_CARD.md"))
    args = parser.parse_args(argv)
    figures = measure(args.model)
    with open(os.path.join(args.model, "model_card.json"), "w") as f:
        json.dump(figures, f, indent=2)
    with open(args.out, "w") as f:
        f.write(render(figures, os.path.relpath(args.model)))
    print(render(figures, os.path.relpath(args.model)))


if __name__ == "__main__":
    main()
