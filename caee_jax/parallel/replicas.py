"""Redundant expert replicas in the runtime: the physical side of an EPLB `Placement` (`eplb.py`).

A model placed with a Placement of P >= E slots holds its routed experts as P physical slots (slot p a
copy of logical expert slot_expert[l, p], gathered once at placement time) and shards them over the
expert axis like any expert stack, so slot p lives on expert shard p // (P / S). The router, the
calibrations indexed by expert (mean outputs, importance) and the per-expert statistics stay logical;
after routing, each (token, expert) pair is mapped to one slot (`to_slots`, the rule of
`Placement.route`) and dispatch and execution see slots only, through the unchanged `run_experts`.

Per MoE layer the model carries three int32 arrays (`SlotTables`): the layer's slot_expert [P],
expert_slots [E, R] (an expert's slots by replica rank, padded with the rank-0 slot) and routed_count
[E] (how many of its replicas receive pairs: the first by rank; the others are the spares of a
speed-aware placement). They are arrays, not constants: a new placement with the same P and R never
recompiles.
Letters: L MoE layers, E logical experts, P physical slots, R most replicas of one expert, S expert
shards, N tokens, K top-k.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from caee_jax.parallel.eplb import Placement


class PlacementError(ValueError):
    """A placement that does not fit the model or the mesh it is used with."""


class SlotTables(NamedTuple):
    """slot_expert [L, P], expert_slots [L, E, R] and routed_count [L, E], int32 (module doc)."""

    slot_expert: np.ndarray
    expert_slots: np.ndarray
    routed_count: np.ndarray


def check_placement(placement: Placement, num_layers: int, num_experts: int, num_shards: int) -> None:
    """PlacementError naming the field when `placement` was made for another model or mesh: its layers
    (MoE layers), experts, devices (expert shards) and slots (a multiple of the expert shards)."""
    layers, slots = placement.slot_expert.shape
    for name, have, want, what in (
        ("layers", layers, num_layers, "MoE layers"),
        ("num_experts", placement.num_experts, num_experts, "routed experts"),
        ("num_devices", placement.num_devices, num_shards, "expert shards"),
    ):
        if have != want:
            raise PlacementError(f"the EPLB placement's {name} is {have}; this model and mesh have {want} {what}")
    if slots % num_shards:
        raise PlacementError(f"the EPLB placement's {slots} slots are not a multiple of the {num_shards} expert shards")
    if placement.slot_expert.min() < 0 or placement.slot_expert.max() >= num_experts:
        raise PlacementError(f"the EPLB placement's slot_expert holds ids outside 0..{num_experts - 1}")
    counts = placement.replica_count
    if (counts < 1).any():
        raise PlacementError("the EPLB placement leaves an expert without a slot (every expert needs one)")
    order = np.lexsort((placement.replica_rank, placement.slot_expert))  # per layer: by expert, then rank
    ranks = np.take_along_axis(placement.replica_rank, order, 1)
    expected = np.stack([np.concatenate([np.arange(c) for c in row]) for row in counts])
    if not np.array_equal(ranks, expected):
        raise PlacementError("the EPLB placement's replica_rank must number each expert's slots 0..count-1")
    routed = placement.routed_count
    if routed.shape != counts.shape or (routed < 1).any() or (routed > counts).any():
        raise PlacementError(
            f"the EPLB placement's routed_count must be [L, E] = {counts.shape} with 1 <= routed <= replicas "
            "for every expert"
        )


def slot_tables(placement: Placement) -> SlotTables:
    """The per-layer arrays the runtime routes with (`to_slots`); padding repeats an expert's first slot."""
    slots = placement.expert_slots()  # [L, E, R], -1 pads
    slots = np.where(slots < 0, slots[..., :1], slots)
    return SlotTables(
        placement.slot_expert.astype(np.int32), slots.astype(np.int32), placement.routed_count.astype(np.int32)
    )


def gather_slots(stack: jax.Array, slot_expert: jax.Array) -> jax.Array:
    """A logical stack [L, E, ...] -> its physical stack [L, P, ...]: slot p holds expert slot_expert[l, p]."""
    index = slot_expert.reshape(*slot_expert.shape, *([1] * (stack.ndim - 2)))
    return jnp.take_along_axis(stack, index, axis=1)


def logical_stack(stack: jax.Array, expert_slots: jax.Array) -> jax.Array:
    """`gather_slots`' inverse: a physical stack [L, P, ...] -> [L, E, ...] from each expert's first slot."""
    return gather_slots(stack, expert_slots[:, :, 0])


def to_slots(topk_ids: jax.Array, expert_slots: jax.Array, routed_count: jax.Array) -> jax.Array:
    """One layer's routing topk_ids [N, K] (logical) -> [N, K] physical slots: token n (the row of the
    flattened batch, b * T + t) sends its pair with expert e to e's replica n mod routed_count[e]
    (`Placement.route`: a fixed spread, no feedback). expert_slots [E, R], routed_count [E]."""
    rank = jnp.arange(topk_ids.shape[0], dtype=jnp.int32)[:, None] % routed_count[topk_ids]
    return expert_slots[topk_ids, rank]
