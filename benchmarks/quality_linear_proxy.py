"""Would a cheap linear stand-in for a pruned expert cut the damage of pruning it?

Issue 20 asks for better compensation. `mean` compensation adds an expert's calibrated mean output for a
pruned slot and explains 10-13% of a slot's output energy. This fits, per routed expert, a rank-r linear
map from the MoE input to the expert's output (ridge regression on the tokens routed to it, then the
fitted values' top r principal directions) on calibration text, and measures on another text:

- the energy of the gate-weighted expert outputs that the mean and the linear map leave unexplained;
- the damage of pruning every slot whose combine weight is below t in every MoE layer (full-sequence
  passes), with nothing, the mean, or the linear map added for the pruned slots: KL(unpruned || pruned),
  perplexity rise and top-1 agreement.

It uses transformers' DeepseekV3ForCausalLM on the bundled weights (torch is the reference here, never a
runtime dependency):

    PYTHONPATH=. .venv/bin/python benchmarks/quality_linear_proxy.py --fit-text runs/stdlib-train.txt \
        --text runs/heldout-numpy-1800k.txt
"""

from __future__ import annotations

import argparse
import math
import os

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import DeepseekV3ForCausalLM

import caee_jax

STAND_IN_RIDGE = 1e-2  # the stand-ins' default ridge penalty, over the mean diagonal


def windows(tokenizer: Tokenizer, path: str, tokens: int, length: int) -> torch.Tensor:
    """[tokens // length, length] token ids from the start of the text file at `path`."""
    with open(path, encoding="utf-8") as f:
        ids = tokenizer.encode(f.read(tokens * 8)).ids[:tokens]
    rows = len(ids) // length
    return torch.tensor(np.asarray(ids[: rows * length]).reshape(rows, length))


def moe_inputs(model, ids: torch.Tensor, layers: list[int], batch: int = 8) -> dict[int, torch.Tensor]:
    """Each MoE layer's input [tokens, hidden] over the windows ids [N, T]."""
    captured = {layer: [] for layer in layers}
    hooks = [
        model.model.layers[layer].mlp.register_forward_hook(
            lambda module, args, out, layer=layer: captured[layer].append(args[0].reshape(-1, args[0].shape[-1]))
        )
        for layer in layers
    ]
    with torch.no_grad():
        for start in range(0, len(ids), batch):
            model(ids[start : start + batch])
    for hook in hooks:
        hook.remove()
    return {layer: torch.cat(xs) for layer, xs in captured.items()}


def expert_output(experts, e: int, x: torch.Tensor) -> torch.Tensor:
    """Routed expert e's SwiGLU output [n, hidden] for inputs x [n, hidden] (no gate weight)."""
    gate, up = experts.gate_up_proj[e].chunk(2, 0)
    return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ experts.down_proj[e].T


def ridge_fit(x: torch.Tensor, y: torch.Tensor, ridge: float) -> torch.Tensor:
    """Coefficients [D + 1, ...] (the last row the offset) of the ridge regression of y [n, ...] on x [n, D]
    with an offset, in float64; the penalty is `ridge` times the mean diagonal of the Gram matrix."""
    xa = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.double)], 1)
    penalty = ridge * xa.pow(2).sum() / xa.shape[1] * torch.eye(xa.shape[1], dtype=torch.double)
    return torch.linalg.solve(xa.T @ xa + penalty, xa.T @ y.double())


def fit_stand_ins(model, inputs: dict[int, torch.Tensor], rank: int, ridge: float) -> dict:
    """Per MoE layer and expert: (mean [hidden], linear map as (x -> coords [hidden, r], offset [r],
    coords -> output [r, hidden], output mean [hidden])), fitted on the tokens routed to the expert."""
    fitted = {}
    with torch.no_grad():
        for layer, x_all in inputs.items():
            mlp = model.model.layers[layer].mlp
            _, _, topk = mlp.gate(x_all)
            per_expert = []
            for e in range(mlp.experts.num_experts):
                x = x_all[(topk == e).any(1)]
                y = expert_output(mlp.experts, e, x).double()
                coef = ridge_fit(x, y, ridge)
                fit = x.double() @ coef[:-1] + coef[-1]
                centre = fit.mean(0)
                basis = torch.linalg.svd(fit - centre, full_matrices=False)[2][:rank].T  # [hidden, r]
                linear = (coef[:-1] @ basis, (coef[-1] - centre) @ basis, basis.T, centre)
                per_expert.append((y.mean(0).float(), tuple(t.float() for t in linear)))
            fitted[layer] = per_expert
    return fitted


def stand_in(kind: str, fitted, x: torch.Tensor) -> torch.Tensor:
    """What `kind` adds for a pruned slot of an expert with stand-ins `fitted`, inputs x [n, hidden]."""
    mean, (to_coords, offset, to_output, centre) = fitted
    if kind == "mean":
        return mean.expand_as(x)
    return (x @ to_coords + offset) @ to_output + centre


def unexplained_energy(model, inputs: dict[int, torch.Tensor], fitted: dict) -> dict[int, dict[str, float]]:
    """Per MoE layer: the share of the gate-weighted routed outputs' energy that each stand-in leaves."""
    shares = {}
    with torch.no_grad():
        for layer, x_all in inputs.items():
            mlp = model.model.layers[layer].mlp
            _, weights, topk = mlp.gate(x_all)
            left = {"mean": 0.0, "linear": 0.0}
            total = 0.0
            for e in range(mlp.experts.num_experts):
                routed = topk == e
                rows = routed.any(1)
                x, w = x_all[rows], (weights * routed).sum(1)[rows, None]
                y = expert_output(mlp.experts, e, x)
                total += (w * y).pow(2).sum().item()
                for kind in left:
                    left[kind] += (w * (y - stand_in(kind, fitted[layer][e], x))).pow(2).sum().item()
            shares[layer] = {kind: value / total for kind, value in left.items()}
    return shares


def pruned_experts_forward(experts, fitted, setting: dict):
    """A replacement for transformers' expert loop: slots with combine weight below setting['threshold']
    are pruned, and setting['kind'] ('none', 'mean' or 'linear') is added in their place; it counts the
    routed pairs and the pruned ones into setting['pairs'] and setting['pruned']."""

    def forward(hidden, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden)
        for e in range(experts.num_experts):
            token, slot = (top_k_index == e).nonzero(as_tuple=True)
            if len(token) == 0:
                continue
            x, w = hidden[token], top_k_weights[token, slot, None]
            y = expert_output(experts, e, x)
            keep = w >= setting["threshold"]
            setting["pairs"] += len(token)
            setting["pruned"] += int((~keep).sum())
            replacement = 0.0 if setting["kind"] == "none" else stand_in(setting["kind"], fitted[e], x)
            out.index_add_(0, token, w * torch.where(keep, y, replacement))
        return out

    return forward


def bundled_reference() -> tuple[DeepseekV3ForCausalLM, Tokenizer, list[int]]:
    """transformers' DeepseekV3ForCausalLM on the bundled weights (float32, eval mode), its tokenizer and the
    indices of its MoE layers."""
    model_dir = caee_jax.api.BUNDLED_MODEL
    model = DeepseekV3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    return model, tokenizer, [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")]


def log_probs(model, ids: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """[N, T, V] next-token log-probabilities over the windows ids [N, T]."""
    with torch.no_grad():
        return torch.cat([torch.log_softmax(model(ids[i : i + batch]).logits, -1) for i in range(0, len(ids), batch)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fit-text", required=True, help="calibration text (the stand-ins are fitted on it)")
    parser.add_argument("--text", required=True, help="evaluation text")
    parser.add_argument("--fit-tokens", type=int, default=65536)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--length", type=int, default=256, help="tokens per window")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--ridge", type=float, default=STAND_IN_RIDGE, help="ridge penalty over the mean diagonal")
    parser.add_argument("--thresholds", default="0.3,0.45,0.6", help="combine-weight thresholds (weights sum to 2.5)")
    args = parser.parse_args()
    model, tokenizer, layers = bundled_reference()

    fit_ids = windows(tokenizer, args.fit_text, args.fit_tokens, args.length)
    fitted = fit_stand_ins(model, moe_inputs(model, fit_ids, layers), args.rank, args.ridge)
    ids = windows(tokenizer, args.text, args.tokens, args.length)
    print(f"fitted on {fit_ids.numel():,} tokens, evaluated on {ids.numel():,}; rank {args.rank}")
    for layer, share in unexplained_energy(model, moe_inputs(model, ids, layers), fitted).items():
        print(f"MoE layer {layer}: unexplained energy, mean {share['mean']:.3f}, linear {share['linear']:.3f}")

    setting = {"threshold": 0.0, "kind": "none", "pairs": 0, "pruned": 0}
    for layer in layers:
        experts = model.model.layers[layer].mlp.experts
        experts.forward = pruned_experts_forward(experts, fitted[layer], setting)
    unpruned = log_probs(model, ids)
    target = ids[:, 1:, None]

    def nll(lp: torch.Tensor) -> float:
        return -lp[:, :-1].gather(2, target).mean().item()

    print("threshold  stand-in  pruned pairs  KL      ppl rise  top-1 agreement")
    for threshold in (float(t) for t in args.thresholds.split(",")):
        for kind in ("none", "mean", "linear"):
            setting.update(threshold=threshold, kind=kind, pairs=0, pruned=0)
            pruned = log_probs(model, ids)
            share = setting["pruned"] / setting["pairs"]
            kl = (unpruned.exp() * (unpruned - pruned)).sum(-1).mean().item()
            rise = math.exp(nll(pruned) - nll(unpruned)) - 1
            agree = (pruned.argmax(-1) == unpruned.argmax(-1)).double().mean().item()
            print(f"{threshold:<9}  {kind:<8}  {100 * share:11.1f}%  {kl:.4f}  {100 * rise:+.2f}%    {agree:.4f}")


if __name__ == "__main__":
    main()
