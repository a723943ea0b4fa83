"""How the MoE layers execute: one static, hashable value passed down every model call.

A different value compiles a different program; routing, batch contents and cache never do.
"""

from __future__ import annotations

import dataclasses

from caee_jax.caee.cost_table import CostTable
from caee_jax.caee.pruning import Pruning
from caee_jax.experts import ExpertBackend

DISPATCH_MODES = ("auto", "gather", "all_to_all")


@dataclasses.dataclass(frozen=True)
class Execution:
    """backend: how a device runs its (local) routed experts.

    Under a mesh with an expert or tensor axis (see `parallel/expert_parallel.py`):
    dispatch: "gather" (every expert shard sees every token; results summed), "all_to_all" (each pair
      travels to the device holding its expert), or "auto": gather for single-token decode steps,
      all_to_all for prefill.
    ep_capacity_factor: all_to_all slots per (source, destination) device pair, as a multiple of the
      mean (pairs / expert shards); None sizes them so that no pair can ever be dropped. Dropped pairs
      are counted in `Routing.dropped_pairs`.
    pruning: a CAEEConfig or PeerRule applied to every MoE layer before its experts run (None: off).
    cost_table: the mesh's calibrated cost table (CAEE needs it); compiled in as constants.
    collect_expert_sums: each MoE layer also returns `Routing.expert_sums` [E, D] f32, every routed expert's
      unweighted output summed over its (token, expert) pairs, pruned or not: the calibration of `mean`
      compensation (`caee/expert_means.py`). It runs the routed experts a second time, one row per pair.
    """

    backend: ExpertBackend = ExpertBackend.LOOP
    dispatch: str = "auto"
    ep_capacity_factor: float | None = None
    pruning: Pruning | None = None
    cost_table: CostTable | None = None
    collect_expert_sums: bool = False

    def __post_init__(self):
        object.__setattr__(self, "backend", ExpertBackend(self.backend))
        if self.dispatch not in DISPATCH_MODES:
            raise ValueError(f"dispatch {self.dispatch!r} is not one of {DISPATCH_MODES}")
        if self.ep_capacity_factor is not None and not self.ep_capacity_factor > 0:
            raise ValueError(f"ep_capacity_factor must be > 0, got {self.ep_capacity_factor}")


DEFAULT_EXECUTION = Execution()
