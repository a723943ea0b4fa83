"""Notebook plots of CAEE's decisions and of a cost table's accuracy. matplotlib is imported on first use.

Each function returns a matplotlib Figure (closed in pyplot, so a notebook shows it once, as the cell's
value); `fig.savefig(path)` writes it.
"""

from __future__ import annotations

import numpy as np

from caee_jax.eval.decisions import PRUNED, REFILLED, Decisions

# Colors of a (token, expert) cell in the decision heatmaps: not routed, kept, kept by refill, pruned.
CELL_COLORS = ("#f4f4f4", "#3a923a", "#7fb8e6", "#d62728")


def plot_decisions(decisions: Decisions, max_tokens: int = 48):
    """One heatmap per MoE layer, tokens (rows, at most `max_tokens`) x experts: routed and kept, kept by
    refill, pruned; and a last one, layers x experts: the share of each expert's routed pairs pruned."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    layers, tokens = decisions.expert.shape[:2]
    shown = min(tokens, max_tokens)
    cells = np.zeros((layers, shown, decisions.num_experts), np.int8)
    for layer, t, k in np.ndindex(layers, shown, decisions.expert.shape[2]):
        reason = decisions.reason[layer, t, k]
        code = 3 if reason == PRUNED else 2 if reason == REFILLED else 1
        cells[layer, t, decisions.expert[layer, t, k]] = code
    routed, pruned = decisions.expert_counts()
    share = np.where(routed > 0, pruned / np.maximum(routed, 1), np.nan)

    fig, axes = plt.subplots(1, layers + 1, figsize=(3.2 * (layers + 1) + 1, 0.16 * shown + 2.2), squeeze=False)
    labels = [repr(text)[1:-1][:10] for text in decisions.token_text[:shown]]
    for layer in range(layers):
        ax = axes[0][layer]
        ax.imshow(cells[layer], cmap=ListedColormap(CELL_COLORS), vmin=0, vmax=3, aspect="auto", interpolation="none")
        ax.set(title=f"layer {decisions.layers[layer]}", xlabel="expert")
        ax.set_yticks(range(shown), labels if layer == 0 else [""] * shown, fontsize=6)
    ax = axes[0][layers]
    image = ax.imshow(share, cmap="Reds", vmin=0, vmax=1, aspect="auto", interpolation="none")
    ax.set(title="pruned share of routed pairs", xlabel="expert", ylabel="layer")
    ax.set_yticks(range(layers), [str(n) for n in decisions.layers])
    fig.colorbar(image, ax=ax, fraction=0.05)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in CELL_COLORS[1:]]
    fig.legend(handles, ["kept", "kept (refill)", "pruned"], loc="lower center", ncol=3, fontsize=8)
    fig.suptitle(f"CAEE theta={decisions.rule.theta:g}, k_min={decisions.rule.k_min}: {int((~decisions.kept).sum())}"
                 f" of {decisions.kept.size} routed slots pruned")  # fmt: skip
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    plt.close(fig)
    return fig


def plot_validation(validation, title: str = "cost table: predicted vs measured MoE layer time"):
    """Predicted against measured layer time (ms) of each validation routing, colored by its token count,
    with the y = x line. validation: a `calibration.costs.Validation` (`validate`), or anything with its
    predicted_s, measured_s [cases] seconds and num_tokens [cases]."""
    import matplotlib.pyplot as plt

    measured, predicted = 1e3 * np.asarray(validation.measured_s), 1e3 * np.asarray(validation.predicted_s)
    mape = np.mean(np.abs(predicted - measured) / measured)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    points = ax.scatter(measured, predicted, c=np.log2(validation.num_tokens), cmap="viridis", s=18)
    limit = [0, 1.05 * max(measured.max(), predicted.max())]
    ax.plot(limit, limit, color="grey", lw=0.8, ls="--")
    ax.set(xlim=limit, ylim=limit, xlabel="measured (ms)", ylabel="predicted (ms)")
    ax.set_title(f"{title}\nMAPE {100 * mape:.1f}% over {len(measured)} routings", fontsize=9)
    bar = fig.colorbar(points, ax=ax)
    bar.set_label("log2 tokens in the batch")
    fig.tight_layout()
    plt.close(fig)
    return fig
