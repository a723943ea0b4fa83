"""Peer pruning rules, the baselines CAEE is measured against, in the same framework (keep mask + compensation).

Each rule has one knob; none of them looks at costs or devices. A token's `k_min` heaviest slots are
never pruned (capacity drop included, so every rule keeps at least as much as CAEE's floor).
  topk        keep the `knob` heaviest slots (static top-k reduction, e.g. R1 8 -> 6)
  top1_ratio  prune w_j < knob * w_max (threshold relative to the top-1 weight)
  mass_ratio  prune w_j < knob * sum(w) (per-position threshold relative to the token's gate mass)
  top_p       keep the heaviest slots until their cumulative share reaches `knob`
  capacity    each expert keeps its ceil(knob * N*K/E) heaviest pairs of the batch (token drop)
Letters: N tokens, K top-k, E experts.

Knob ranges: every knob is a finite number >= 0; topk's a whole number (at most K: `check_top_k`), top_p's
at most 1 (a share). A ratio above 1 or capacity 0 prunes every slot but the k_min protected ones.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from caee_jax import html
from caee_jax.caee.compensation import Compensation
from caee_jax.caee.knobs import check_number, check_slots
from caee_jax.choice import Choice
from caee_jax.routing.ops import capacity_slots, rank_in_group, weight_rank


class PeerRuleName(Choice):
    TOPK = "topk"
    TOP1_RATIO = "top1_ratio"
    MASS_RATIO = "mass_ratio"
    TOP_P = "top_p"
    CAPACITY = "capacity"


PEER_RULES = PeerRuleName.names()


@dataclasses.dataclass(frozen=True)
class PeerRule:
    """name: one of PEER_RULES; knob: its parameter (see the module doc); k_min, compensation: as CAEE's."""

    name: PeerRuleName
    knob: float
    k_min: int = 1
    compensation: Compensation = Compensation.NONE
    partial_alpha: float = 0.5

    def _repr_html_(self) -> str:
        return html.fields_table(self, f"peer rule {self.name.value}", columns=1)

    def __post_init__(self):
        object.__setattr__(self, "name", PeerRuleName.parse(self.name, "peer rule"))
        object.__setattr__(self, "compensation", Compensation.parse(self.compensation, "compensation"))
        check_number(f"{self.name}: knob", self.knob, 0, 1 if self.name is PeerRuleName.TOP_P else math.inf)
        if self.name is PeerRuleName.TOPK and self.knob != int(self.knob):
            raise ValueError(f"topk: knob must be a whole number of slots, got {self.knob}")
        check_slots(f"{self.name}: k_min", self.k_min)
        check_number(f"{self.name}: partial_alpha", self.partial_alpha, 0, 1)


def check_top_k(rule, top_k: int) -> None:
    """A topk rule keeps at most the model's K slots per token: a larger knob is a mistake, not a no-op."""
    if isinstance(rule, PeerRule) and rule.name is PeerRuleName.TOPK and rule.knob > top_k:
        raise ValueError(f"topk: knob {rule.knob:g} is above the model's {top_k} routed experts per token")


def peer_keep_mask(rule: PeerRule, topk_ids: jax.Array, topk_weights: jax.Array, num_experts: int) -> jax.Array:
    """topk_ids, topk_weights [N, K] -> keep_mask [N, K] bool."""
    rank = weight_rank(topk_weights)
    protected = rank < rule.k_min
    total = topk_weights.sum(-1, keepdims=True)
    if rule.name is PeerRuleName.TOPK:
        keep = rank < int(rule.knob)
    elif rule.name is PeerRuleName.TOP1_RATIO:
        keep = topk_weights >= rule.knob * topk_weights.max(-1, keepdims=True)
    elif rule.name is PeerRuleName.MASS_RATIO:
        keep = topk_weights >= rule.knob * total
    elif rule.name is PeerRuleName.TOP_P:
        sorted_weights = -jnp.sort(-topk_weights, axis=-1)
        share_before = (jnp.cumsum(sorted_weights, -1) - sorted_weights) / jnp.maximum(total, 1e-30)
        keep = jnp.take_along_axis(share_before, rank, axis=-1) < rule.knob
    else:
        keep = _within_capacity(rule.knob, topk_ids, topk_weights, num_experts)
    return keep | protected


def _within_capacity(factor: float, topk_ids, topk_weights, num_experts: int) -> jax.Array:
    """Each expert's ceil(factor * mean pairs per expert) heaviest pairs."""
    num_tokens, top_k = topk_ids.shape
    rank = rank_in_group(topk_ids.reshape(-1), topk_weights.reshape(-1), num_experts)
    return (rank < capacity_slots(num_tokens * top_k, num_experts, factor)).reshape(topk_ids.shape)
