"""How the MoE layers execute: one static, hashable plan passed down every model call.

A different plan compiles a different program; routing, batch contents and cache never do. The plan's
backend is the only one: a cost table calibrated for another backend (whose unit of saving differs) is
refused here, so the policy's prices always describe what runs.
"""

from __future__ import annotations

import dataclasses

from caee_jax.caee.cost_table import CostTable
from caee_jax.caee.pruning import Pruning
from caee_jax.choice import Choice
from caee_jax.offload.cache import CacheManager
from caee_jax.parallel.expert_parallel import Dispatch
from caee_jax.routing.backend import ExpertBackend


class DecisionScope(Choice):
    """The tokens a rule that ranks pairs across the batch (CAEE, `capacity`) decides over when the batch is
    split over devices (`data_expert` meshes): BATCH, the whole batch, gathered once per MoE layer (the
    one-device decision); SHARD, each device's own tokens as if they were the batch (no collective)."""

    BATCH = "batch"
    SHARD = "shard"


@dataclasses.dataclass(frozen=True)
class Execution:
    """backend: how a device runs its (local) routed experts.

    Under a mesh with an expert or tensor axis (see `parallel/expert_parallel.py`):
    dispatch: Dispatch.GATHER (every expert shard sees every token, all-gathered first when the batch is
      split over the expert devices (`data_expert` meshes); results summed, or reduce-scattered),
      ALL_TO_ALL (each pair travels to the device holding its expert), or AUTO (`auto_dispatch`): with
      attention replicated, gather for single-token decode steps and all_to_all for prefill; on
      `data_expert` meshes all_to_all. Strings ("gather", ...) are accepted.
    ep_capacity_factor: all_to_all slots per (source, destination) device pair, as a multiple of the
      mean (pairs / expert shards); None sizes them so that no pair can ever be dropped. Dropped pairs
      are counted in `Routing.dropped_pairs`.
    pruning: a CAEEConfig or PeerRule applied to every MoE layer before its experts run (None: off).
    cost_table: the mesh's calibrated cost table (CAEE needs it), for this backend; compiled in as constants.
    offload: the host side of the model's device expert cache (`offload/cache.py`) when the routed experts
      live in an expert store; the step then reads them through the cache (`loop` backend, one device).
    prune_layers: the MoE layers (0-based among the MoE layers) the pruning rule applies to; None: all.
      The layer-sensitivity calibration prunes one layer at a time (`calibration/importance.py`).
    decision_scope: DecisionScope (or its string): on a batch split over devices, whether CAEE and
      `capacity` decide over the whole batch or over each device's tokens.
    """

    backend: ExpertBackend = ExpertBackend.LOOP
    dispatch: Dispatch = Dispatch.AUTO
    ep_capacity_factor: float | None = None
    pruning: Pruning | None = None
    cost_table: CostTable | None = None
    offload: CacheManager | None = None
    prune_layers: tuple[int, ...] | None = None
    decision_scope: DecisionScope = DecisionScope.BATCH

    def __post_init__(self):
        object.__setattr__(self, "backend", ExpertBackend(self.backend))
        object.__setattr__(self, "dispatch", Dispatch.parse(self.dispatch, "dispatch"))
        object.__setattr__(self, "decision_scope", DecisionScope.parse(self.decision_scope, "decision scope"))
        if self.prune_layers is not None:
            layers = tuple(self.prune_layers)
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
                raise ValueError(f"prune_layers must be MoE layer numbers >= 0, got {self.prune_layers!r}")
            object.__setattr__(self, "prune_layers", layers)
        if self.ep_capacity_factor is not None and not self.ep_capacity_factor > 0:
            raise ValueError(f"ep_capacity_factor must be > 0, got {self.ep_capacity_factor}")
        if self.offload is not None and self.backend is not ExpertBackend.LOOP:
            raise ValueError(f"offloaded experts run on the 'loop' backend; this plan runs {self.backend.value!r}")
        if self.cost_table is not None and self.cost_table.backend is not self.backend:
            raise ValueError(
                f"the cost table prices backend {self.cost_table.backend.value!r}; this plan runs "
                f"{self.backend.value!r} (calibrate a table for it with launch/calibrate.py --backend)"
            )


DEFAULT_EXECUTION = Execution()
