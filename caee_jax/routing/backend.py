"""What every layer needs to know about expert execution without running it: the backend's name, its
unit of saving (the row tile), and the stacked expert weights."""

from __future__ import annotations

import enum
from typing import NamedTuple

import jax


class ExpertBackend(enum.Enum):
    """How routed experts execute (implementations in `caee_jax/experts/`).

    DENSE: every expert on every token, masked combine (reference; cost E x N).
    LOOP: XLA while-loop over active experts and row tiles of their kept tokens (CPU default; cost
    follows kept token-expert pairs, in whole tiles, and active experts).
    CAPACITY: static-shape [E, C, D] dispatch, C = ceil(capacity_factor * N*K/E); an expert's
    lowest-weight pairs beyond C are dropped (training path; differentiable).
    PALLAS: grouped SwiGLU kernel over expert-sorted kept pairs (GPU/TPU; interpret mode on CPU); an
    expert with no kept pair has its weights never loaded (docs/KERNELS.md).
    """

    DENSE = "dense"
    LOOP = "loop"
    CAPACITY = "capacity"
    PALLAS = "pallas"

    @property
    def runs_fp8(self) -> bool:
        """Whether the backend runs fp8 weights with their block scales (`routing/storage.py`)."""
        return self in (ExpertBackend.LOOP, ExpertBackend.PALLAS)

    def row_tile(self, num_pairs: int, num_experts: int) -> int:
        """Rows an expert's kept pairs are computed in, for `num_pairs` = tokens x K of the whole batch over
        the model's `num_experts` routed experts (on every mesh: a device holding some of the experts sees
        their share of the pairs): LOOP's tile (a pruned pair saves time only when it empties a tile), else
        1 (every pair counts)."""
        return default_tile_rows(num_pairs, num_experts) if self is ExpertBackend.LOOP else 1


def default_tile_rows(num_pairs: int, num_experts: int) -> int:
    """LOOP's rows per tile: about twice the mean pairs per expert, a power of two in [8, 128]."""
    mean = max(1, (2 * num_pairs) // num_experts)
    return int(min(128, max(8, 1 << (mean - 1).bit_length())))


class ExpertWeights(NamedTuple):
    """Stacked SwiGLU expert weights: gate, up [E, D, F]; down [E, F, D] (a leading layer axis [L, ...]
    when a backend is given `layer_index`)."""

    gate: jax.Array
    up: jax.Array
    down: jax.Array
