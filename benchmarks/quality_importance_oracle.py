"""How much could a better per-slot importance give? The gate weight against the output it weighs.

CAEE ranks a token's prunable slots by their gate weight w (times calibrated per-layer and per-expert
factors). What a pruned slot removes from the residual stream is w * y, y the expert's output for the token,
known only once the expert has run. This ranks the prunable slots (every slot but each token's heaviest) of
each MoE layer by four signals and prunes the same fraction q of them in every layer (full-sequence passes,
each layer's own quantile), then measures KL(unpruned || pruned) and top-1 agreement with the unpruned model:

  weight   w (the signal CAEE uses)
  oracle   w * |y| (a ceiling: needs the expert's output, i.e. its weights read)
  lognorm  w * exp(a_e . x + b_e): a per-expert linear regression of log |y| on the MoE input x (ridge,
           fitted on calibration text; D + 1 floats per expert)
  sketchR  w * |y_R|, y_R the expert computed with rank-R truncations of its three matrices (R * 3 * (D + I)
           floats per expert, printed as a share of the expert)

and, with `--stand-in-rank R`, three more with a pruned slot replaced by `quality_linear_proxy.py`'s rank-R
linear stand-in y_lin rather than dropped (the two ideas combined): weight+linear, lognorm+linear and
oracle+linear, the last ranked by w * |y - y_lin| (what the stand-in misses: its ceiling).

The KL the oracle saves over `weight` at equal pruned fraction bounds what any signal known before the step
could save this way; the two cheap predictors show how much of it is within reach, and at what read. It uses
transformers' DeepseekV3ForCausalLM on the bundled weights (torch is the reference here, never a runtime
dependency). Perplexity is not printed: in full-sequence passes it is no damage measure
(`quality_linear_proxy.py`).

    PYTHONPATH=. .venv/bin/python benchmarks/quality_importance_oracle.py --fit-text runs/stdlib-train.txt \
        --text runs/heldout-numpy-1800k.txt
"""

from __future__ import annotations

import argparse

import torch
from quality_linear_proxy import (
    STAND_IN_RIDGE,
    bundled_reference,
    expert_output,
    fit_stand_ins,
    log_probs,
    moe_inputs,
    ridge_fit,
    stand_in,
    windows,
)
from tqdm import tqdm


def fit_log_norm(model, inputs: dict[int, torch.Tensor], ridge: float) -> dict[int, list[torch.Tensor]]:
    """Per MoE layer and expert: coefficients [D + 1] of log |y| on [x, 1], over the tokens routed to it."""
    fitted = {}
    with torch.no_grad():
        for layer, x_all in inputs.items():
            mlp = model.model.layers[layer].mlp
            _, _, topk = mlp.gate(x_all)
            fitted[layer] = []
            for e in range(mlp.experts.num_experts):
                x = x_all[(topk == e).any(1)]
                target = expert_output(mlp.experts, e, x).norm(dim=-1).log()
                fitted[layer].append(ridge_fit(x, target, ridge).float())
    return fitted


def truncated(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-`rank` approximation of `matrix` (truncated SVD)."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def sketches(experts, rank: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per expert: its gate, up and down matrices truncated to rank `rank`."""
    with torch.no_grad():
        out = []
        for e in range(experts.num_experts):
            gate, up = experts.gate_up_proj[e].chunk(2, 0)
            out.append((truncated(gate, rank), truncated(up, rank), truncated(experts.down_proj[e], rank)))
        return out


def ranked_forward(
    experts, log_norm: list[torch.Tensor], sketch: dict[int, list], stand_ins: list | None, setting: dict
):
    """A replacement for transformers' expert loop that prunes, in this layer, the fraction setting['q'] of
    the prunable slots lowest by the signal setting['signal'] (see the module doc); with a '+linear' signal
    a pruned slot gets its expert's linear stand-in (`stand_ins`, per expert) instead of nothing."""

    def forward(hidden, top_k_index, top_k_weights):
        tokens, top_k = top_k_index.shape
        outputs = hidden.new_zeros(tokens, top_k, hidden.shape[1])
        fills = hidden.new_zeros(tokens, top_k, hidden.shape[1])  # what a pruned slot adds instead
        norm = hidden.new_ones(tokens, top_k)  # the signal's per-slot factor multiplying w
        signal, linear = setting["signal"].removesuffix("+linear"), setting["signal"].endswith("+linear")
        for e in range(experts.num_experts):
            token, slot = (top_k_index == e).nonzero(as_tuple=True)
            if len(token) == 0:
                continue
            x = hidden[token]
            y = expert_output(experts, e, x)
            outputs[token, slot] = y
            if linear:
                fills[token, slot] = stand_in("linear", stand_ins[e], x)
            if signal == "oracle":
                norm[token, slot] = (y - fills[token, slot]).norm(dim=-1)
            elif signal == "lognorm":
                norm[token, slot] = (x @ log_norm[e][:-1] + log_norm[e][-1]).exp()
            elif signal.startswith("sketch"):
                gate, up, down = sketch[int(signal.removeprefix("sketch"))][e]
                norm[token, slot] = ((torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T).norm(dim=-1)
        score = top_k_weights * norm
        heaviest = torch.nn.functional.one_hot(top_k_weights.argmax(-1), top_k).bool()
        keep = torch.ones_like(heaviest)
        if setting["q"] > 0:
            keep = heaviest | (score > torch.quantile(score[~heaviest], setting["q"]))
        return (top_k_weights[..., None] * torch.where(keep[..., None], outputs, fills)).sum(1)

    return forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fit-text", required=True, help="calibration text (the log-norm regression is fitted on it)")
    parser.add_argument("--text", required=True, help="evaluation text")
    parser.add_argument("--fit-tokens", type=int, default=32768)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--length", type=int, default=256, help="tokens per window")
    parser.add_argument("--ridge", type=float, default=1e-4, help="ridge penalty over the mean diagonal")
    parser.add_argument("--ranks", default="16,64", help="sketch ranks")
    parser.add_argument("--fractions", default="0.3,0.5,0.7", help="fractions q of the prunable slots pruned")
    parser.add_argument("--stand-in-rank", type=int, default=0, help="rank of the '+linear' stand-ins (0: none)")
    args = parser.parse_args()
    model, tokenizer, layers = bundled_reference()
    ranks = [int(r) for r in args.ranks.split(",")]
    config = model.config
    expert_size = 3 * config.hidden_size * config.moe_intermediate_size
    fit_ids = windows(tokenizer, args.fit_text, args.fit_tokens, args.length)
    fit_inputs = moe_inputs(model, fit_ids, layers)
    log_norm = fit_log_norm(model, fit_inputs, args.ridge)
    # The stand-ins keep their own default ridge penalty (a map per expert, not a log-norm).
    stand_ins = fit_stand_ins(model, fit_inputs, args.stand_in_rank, STAND_IN_RIDGE) if args.stand_in_rank else {}
    ids = windows(tokenizer, args.text, args.tokens, args.length)
    print(f"log-norm fitted on {fit_ids.numel():,} tokens; evaluated on {ids.numel():,}")
    print(f"lognorm: {100 * (config.hidden_size + 1) / expert_size:.2f}% of an expert's weights")
    for rank in ranks:
        share = rank * 3 * (config.hidden_size + config.moe_intermediate_size) / expert_size
        print(f"sketch{rank}: {100 * share:.1f}% of an expert's weights")

    setting = {"signal": "weight", "q": 0.0}
    for layer in layers:
        experts = model.model.layers[layer].mlp.experts
        per_rank = {rank: sketches(experts, rank) for rank in ranks}
        experts.forward = ranked_forward(experts, log_norm[layer], per_rank, stand_ins.get(layer), setting)
    unpruned = log_probs(model, ids)
    signals = ["weight", "oracle", "lognorm"] + [f"sketch{rank}" for rank in ranks]
    signals += [f"{signal}+linear" for signal in ("weight", "lognorm", "oracle")] if args.stand_in_rank else []
    cases = [(float(q), signal) for q in args.fractions.split(",") for signal in signals]
    print("| pruned fraction of prunable slots | signal | KL | KL / weight's | top-1 agreement |")
    print("|---|---|---|---|---|")
    reference = {}
    for q, signal in tqdm(cases, desc="cases", unit="case"):
        setting.update(signal=signal, q=q)
        pruned = log_probs(model, ids)
        kl = (unpruned.exp() * (unpruned - pruned)).sum(-1).mean().item()
        agree = (pruned.argmax(-1) == unpruned.argmax(-1)).double().mean().item()
        reference.setdefault(q, kl)
        tqdm.write(f"| {q:g} | {signal} | {kl:.4f} | {kl / reference[q]:.2f} | {agree:.4f} |")


if __name__ == "__main__":
    main()
