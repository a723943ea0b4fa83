"""Scoring text with a model: per-token log-likelihood, top-1 correctness and routing.

The token stream is cut into non-overlapping windows; every token after a window's first is
predicted from the window's earlier tokens (full-sequence pass, no cache).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from caee_jax.runtime import steps


@dataclasses.dataclass
class Scores:
    """nll [M] (nats), correct [M] bool, topk_ids [L_moe, M, K], topk_weights [L_moe, M, K] for the M
    scored positions (routing of the token at the position being predicted from)."""

    nll: np.ndarray
    correct: np.ndarray
    topk_ids: np.ndarray
    topk_weights: np.ndarray

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.nll.mean()))

    @property
    def top1_accuracy(self) -> float:
        return float(self.correct.mean())


def score_tokens(model, ids: np.ndarray, window: int = 512, batch: int = 8, progress: bool = True) -> Scores:
    """Scores the stream ids [N] in windows of `window` + 1 tokens, `batch` windows per call."""
    count = (len(ids) - 1) // window
    if count == 0:
        raise ValueError(f"need more than {window} tokens to score, got {len(ids)}")
    windows = np.stack([ids[i * window : i * window + window + 1] for i in range(count)]).astype(np.int32)
    nll, correct, topk_ids, topk_weights = [], [], [], []
    for start in tqdm(range(0, count, batch), desc="score", disable=not progress):
        chunk = windows[start : start + batch]
        n = len(chunk)
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])  # one compiled shape
        result = steps.score_windows(model.graphdef, model.state, jnp.asarray(padded), execution=model.execution)
        nll.append(np.asarray(result[0])[:n].reshape(-1))
        correct.append(np.asarray(result[1])[:n].reshape(-1))
        layers, _, _, k = result[2].shape  # [L, B, T, K]
        topk_ids.append(np.asarray(result[2])[:, :n].reshape(layers, -1, k))
        topk_weights.append(np.asarray(result[3])[:, :n].reshape(layers, -1, k))
    return Scores(
        np.concatenate(nll), np.concatenate(correct), np.concatenate(topk_ids, 1), np.concatenate(topk_weights, 1)
    )


def expert_load(topk_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """Tokens per expert per MoE layer: topk_ids [L, M, K] -> [L, E]."""
    return np.stack([np.bincount(layer.reshape(-1), minlength=num_experts) for layer in topk_ids])


def gate_rank_profile(topk_weights: np.ndarray) -> np.ndarray:
    """Mean share of a token's routed gate mass held by its 1st, 2nd, ... largest weight: [L, K]."""
    ordered = -np.sort(-topk_weights, axis=-1)
    return (ordered / ordered.sum(-1, keepdims=True)).mean(axis=1)
