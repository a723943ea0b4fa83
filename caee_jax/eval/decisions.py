"""Per token and MoE layer, what CAEE decided for a prompt and why: a table for notebooks and plots.

The prompt runs through the model once (as a prefill: its T tokens are one batch of the decide stage,
which is what CAEE prices), with the model's own pruning; each layer's routing is then explained by
`caee.policy.explain` with the same rule and table, and its keep mask must equal what the model ran.
Letters: L MoE layers, T prompt tokens, K top-k, E experts, S devices (expert shards).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from caee_jax import html
from caee_jax.caee.cost_model import predict
from caee_jax.caee.cost_table import CostTable
from caee_jax.caee.policy import CAEEConfig, explain
from caee_jax.parallel.placement import mesh_context
from caee_jax.runtime import steps
from caee_jax.runtime.generate import encode_prompts

# Why a routed slot ran or not, in `Decisions.reason` (codes index this tuple).
REASONS = (
    "kept: among the token's k_min heaviest",
    "kept: score >= theta",
    "kept: its device is not above target",
    "kept: refilled (fits in its expert's computed rows)",
    "pruned: low score on a straggler device",
)
PROTECTED, HIGH_SCORE, UNDER_TARGET, REFILLED, PRUNED = range(len(REASONS))


@dataclasses.dataclass(frozen=True)
class Decisions:
    """CAEE's decisions for one prompt. tokens [T] ids and token_text [T] (their text, when the model has
    a tokenizer); layers [L]: decoder-layer number of each MoE layer; per slot [L, T, K]: expert, gate
    weight, importance, cost_s (marginal predicted seconds), cost (relative to the mean slot), score,
    device, kept (bool), reason (index into REASONS); device_s, device_kept_s [L, S]: predicted expert time
    per device before and after pruning (s); rule and table used; num_experts E."""

    tokens: np.ndarray
    token_text: list[str]
    layers: np.ndarray
    expert: np.ndarray
    gate_weight: np.ndarray
    importance: np.ndarray
    cost_s: np.ndarray
    cost: np.ndarray
    score: np.ndarray
    device: np.ndarray
    kept: np.ndarray
    reason: np.ndarray
    device_s: np.ndarray
    device_kept_s: np.ndarray
    rule: CAEEConfig
    table: CostTable
    num_experts: int

    def rows(self) -> list[dict]:
        """One dict per (layer, token, slot), in that order: a DataFrame-ready table
        (`pandas.DataFrame(d.rows())`)."""
        out = []
        for (layer, t, k), expert in np.ndenumerate(self.expert):
            out.append(
                dict(
                    layer=int(self.layers[layer]), position=t, token=self.token_text[t], slot=k, expert=int(expert),
                    gate_weight=float(self.gate_weight[layer, t, k]), importance=float(self.importance[layer, t, k]),
                    cost_us=1e6 * float(self.cost_s[layer, t, k]), cost=float(self.cost[layer, t, k]),
                    score=float(self.score[layer, t, k]), device=int(self.device[layer, t, k]),
                    kept=bool(self.kept[layer, t, k]), reason=REASONS[self.reason[layer, t, k]],
                )
            )  # fmt: skip
        return out

    def expert_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """(routed, pruned) pairs per layer and expert, each [L, E] int."""
        routed = np.zeros((len(self.layers), self.num_experts), np.int64)
        pruned = np.zeros_like(routed)
        for layer in range(len(self.layers)):
            np.add.at(routed[layer], self.expert[layer].ravel(), 1)
            np.add.at(pruned[layer], self.expert[layer][~self.kept[layer]], 1)
        return routed, pruned

    def summary(self) -> dict:
        """Pairs pruned overall and per reason, and the predicted expert time cut per layer."""
        counts = np.bincount(self.reason.ravel(), minlength=len(REASONS))
        before, after = self.device_s.max(-1), self.device_kept_s.max(-1)
        return dict(
            pairs=int(self.kept.size),
            pruned=int((~self.kept).sum()),
            reasons={REASONS[i]: int(c) for i, c in enumerate(counts)},
            predicted_layer_cut=(1 - after / np.maximum(before, 1e-30)).tolist(),
        )

    def html(self, position: int | None = None, layer: int | None = None, max_rows: int = 40) -> str:
        """The rows as an HTML table (`IPython.display.HTML`), optionally of one token position and/or one
        decoder layer, at most `max_rows` of them."""
        rows = [
            r
            for r in self.rows()
            if (position is None or r["position"] == position) and (layer is None or r["layer"] == layer)
        ]
        header = list(rows[0]) if rows else []
        shown = [[r[h] for h in header] for r in rows[:max_rows]]
        return html.table(f"CAEE decisions: {len(shown)} of {len(rows)} routed slots shown", header, shown)

    def _repr_html_(self) -> str:
        return self.html()


def caee_decisions(model, prompt, rule: CAEEConfig | None = None, table: CostTable | None = None) -> Decisions:
    """CAEE's decisions for `prompt` (text, or token ids) on `model`, per MoE layer, token and routed slot.

    rule, table: default to the model's own (`model.execution`); a model loaded without pruning needs
    both. Runs on the model's mesh like any call; offloaded models and models with EPLB replicas are not
    supported.
    """
    execution = model.execution
    rule = rule or execution.pruning
    table = table or execution.cost_table
    if not isinstance(rule, CAEEConfig) or table is None:
        raise ValueError(f"caee_decisions needs a CAEEConfig rule and a cost table; got rule {rule!r}, table {table}")
    if execution.offload is not None:
        raise ValueError("caee_decisions runs the experts on device; load the model without offload")
    if model.placement is not None:
        raise ValueError(
            "caee_decisions explains a model without EPLB replicas (one slot per expert); load it unplaced"
        )
    execution = dataclasses.replace(execution, pruning=rule, cost_table=table)
    (ids,) = encode_prompts(model, [prompt])
    limit = model.config.max_position_embeddings
    if len(ids) > limit:
        raise ValueError(f"prompt has {len(ids)} tokens; the model's context is {limit}")
    tokens = np.asarray([ids], np.int32)
    with mesh_context(model.mesh):
        routed = steps.routing(model.graphdef, model.state, jnp.asarray(tokens), execution=execution)
    topk_ids, topk_weights, keep_mask = (np.asarray(a)[:, 0] for a in routed)  # [L, T, K]
    parts = jax.tree.map(np.asarray, _explain_layers(table, rule, topk_ids, topk_weights))
    if not np.array_equal(parts.keep, keep_mask):
        raise RuntimeError("caee_decisions: the explained keep mask differs from the one the model ran (a bug)")
    reason = np.select(
        [parts.protected, ~parts.candidate, ~parts.eligible, parts.pruned & parts.keep],
        [PROTECTED, HIGH_SCORE, UNDER_TARGET, REFILLED],
        PRUNED,
    )
    kept_s = _predict_layers(table, topk_ids, keep_mask)
    texts = [(model.tokenizer.decode([t]) if model.tokenizer else "") or f"<{t}>" for t in ids]
    first_moe = model.config.first_k_dense_replace
    return Decisions(
        tokens=np.asarray(ids), token_text=texts, layers=np.arange(first_moe, first_moe + len(topk_ids)),
        expert=topk_ids, gate_weight=topk_weights, importance=parts.importance,
        cost_s=parts.cost_s, cost=parts.cost, score=parts.score,
        device=parts.device, kept=keep_mask, reason=reason, device_s=parts.device_s,
        device_kept_s=np.asarray(kept_s), rule=rule, table=table, num_experts=model.config.n_routed_experts,
    )  # fmt: skip


@functools.partial(jax.jit, static_argnums=(0, 1))
def _explain_layers(table, rule, topk_ids, topk_weights):
    """`explain` of every layer: [L, T, K] inputs -> Explanation with a leading layer axis."""
    return jax.vmap(lambda i, w: explain(table, rule, i, w))(topk_ids, topk_weights)


@functools.partial(jax.jit, static_argnums=0)
def _predict_layers(table, topk_ids, keep_mask):
    """Predicted time per layer and device [L, S] of the kept pairs."""
    return jax.vmap(lambda i, k: predict(table, i, k).device_s)(topk_ids, keep_mask)
