"""What pruning one MoE layer does to the predictions, per layer and by the pruned slot's gate share.

The probes of CAEE's importance calibration (`calibration/importance.py`: each token's lightest slot pruned
in one MoE layer, every other layer unpruned), token by token over calibration text: correct top-1
predictions lost, wrong ones gained (the relative top-1 drop counts lost minus gained), the rise of the true
token's NLL and the KL to the unpruned distribution, overall and by quartile of the pruned share. The
calibration's sensitivity uses the lost predictions only (`--sensitivity top1`) or the KL.

    PYTHONPATH=. .venv/bin/python benchmarks/quality_layer_probes.py --text runs/stdlib-train.txt
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

import caee_jax
from caee_jax.calibration.expert_means import calibration_batches
from caee_jax.calibration.importance import probes
from caee_jax.model.execution import Execution

MEASURES = ("share", "lost", "gained", "nll_rise", "kl")


def layer_probes(model: caee_jax.Model):
    """A jitted function: tokens [B, T] -> per MoE layer, the `MEASURES` of its probe per predicted token
    [B, T - 1]: pruned share of the layer's gate mass, correct prediction lost, wrong one gained (bool), NLL
    rise of the true token and KL(unpruned || probe) (nats)."""
    plans = probes(model)
    unpruned = Execution(model.execution.backend, dispatch=model.execution.dispatch)

    @jax.jit
    def run(state, tokens):
        m = nnx.merge(model.graphdef, state)
        base = jax.nn.log_softmax(m(tokens, execution=unpruned).logits[:, :-1], -1)
        truth = tokens[:, 1:]
        correct = jnp.argmax(base, -1) == truth
        out = []
        for layer, plan in enumerate(plans):
            pruned = m(tokens, execution=plan)
            logprobs = jax.nn.log_softmax(pruned.logits[:, :-1], -1)
            weights, keep = pruned.routing.topk_weights[layer, :, :-1], pruned.routing.keep_mask[layer, :, :-1]
            right = jnp.argmax(logprobs, -1) == truth
            out.append(dict(
                share=jnp.sum(jnp.where(keep, 0.0, weights), -1) / jnp.sum(weights, -1),
                lost=correct & ~right,
                gained=~correct & right,
                nll_rise=jnp.take_along_axis(base - logprobs, truth[..., None], -1)[..., 0],
                kl=jnp.sum(jnp.exp(base) * (base - logprobs), -1),
            ))  # fmt: skip
        return out

    return lambda tokens: run(model.state, jnp.asarray(tokens))


def by_quartile(values: np.ndarray, quartile: np.ndarray) -> str:
    """The mean of `values` [M] in each share quartile (`quartile` [M] in 0..3)."""
    return " / ".join(f"{values[quartile == q].mean():.4f}" for q in range(4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", required=True, help="calibration text (the training split)")
    parser.add_argument("--tokens", type=int, default=65536)
    args = parser.parse_args()
    model = caee_jax.load()
    with open(args.text) as f:
        ids = model.text_ids(f.read())
    batches = calibration_batches(model, ids, args.tokens, 256, 8)
    probe = layer_probes(model)
    runs = [probe(batch) for batch in tqdm(batches, desc="probes", unit="batch")]
    per_layer = [
        {k: np.concatenate([np.asarray(run[layer][k]).ravel() for run in runs]) for k in MEASURES}
        for layer in range(model.config.num_moe_layers)
    ]
    print(f"{per_layer[0]['share'].size} predicted tokens per layer; each token's lightest slot pruned in one layer")
    print(
        "| MoE layer | mean share | lost | gained | net (lost - gained) | net per unit share "
        "| NLL rise per unit share | KL per unit share | net by share quartile | NLL rise by share quartile |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for layer, m in enumerate(per_layer):
        share, net = m["share"], m["lost"].astype(float) - m["gained"]
        edges = np.quantile(share, [0, 0.25, 0.5, 0.75, 1])
        quartile = np.clip(np.searchsorted(edges, share, side="right") - 1, 0, 3)
        se = net.std() / np.sqrt(net.size)
        print(f"| {layer} | {share.mean():.3f} | {m['lost'].mean():.4f} | {m['gained'].mean():.4f} | "
              f"{net.mean():+.4f} ± {2 * se:.4f} | {net.sum() / share.sum():+.4f} | "
              f"{m['nll_rise'].sum() / share.sum():.4f} | {m['kl'].sum() / share.sum():.4f} | "
              f"{by_quartile(net, quartile)} | {by_quartile(m['nll_rise'], quartile)} |")  # fmt: skip


if __name__ == "__main__":
    main()
