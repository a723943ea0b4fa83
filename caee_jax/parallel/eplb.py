"""Expert-parallel load balancing (EPLB): replicate hot experts, pack replicas so devices carry equal load.

Written from the description of DeepSeek's published balancer (github.com/deepseek-ai/EPLB):
1. Replication: P physical slots for E logical experts (P - E redundant); each extra slot goes to the
   expert with the highest load per replica so far.
2. Packing: items onto packs with equal item counts, heaviest first onto the least-loaded pack that
   still has room (ties: the lowest pack index).
3. Hierarchical (when the node count divides the expert-group count, as with DeepSeek's group-limited
   routing): expert groups are packed onto nodes first, then each node replicates its own experts into
   its P / nodes slots and packs those replicas onto its devices. Global: one node, one group.
Slot p lives on device p // (P / devices). Loads are token counts (routed pairs) from past routing.

Speed-aware (our extension, for devices of unequal speed, e.g. a straggler): with `device_cost` [D]
(each device's time for the same routed work over the fastest's), a device receives pairs in only
`routed_rooms` of its P / D slots, in proportion to its speed; packing puts each replica where the
device's time (load x cost) grows least; a device's other slots hold spare copies that are never routed
(the stack's shape stays static; spares cost memory, no compute). Equal costs give the published
algorithm exactly.

Host-side numpy: placement is planned between serving windows, never inside jit. Letters: L layers,
E logical experts, P physical slots, D devices, N tokens, K top-k.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np


def pack(weights: np.ndarray, rooms: np.ndarray, costs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """weights [n] -> (pack [n], rank [n]): pack i takes rooms[i] items (sum(rooms) == n), heaviest first
    onto the pack with room whose time (load + weight) x costs[i] is then lowest (equal costs: the least
    loaded; ties: the lowest index); rank is the item's position within its pack."""
    rooms = np.asarray(rooms, np.int64)
    costs = np.ones(len(rooms)) if costs is None else np.asarray(costs, np.float64)
    count = len(weights)
    if rooms.sum() != count:
        raise ValueError(f"{count} items do not fill packs of {rooms.tolist()} places")
    pack, rank = np.empty(count, np.int64), np.empty(count, np.int64)
    load, items = np.zeros(len(rooms)), np.zeros(len(rooms), np.int64)
    for item in np.argsort(-np.asarray(weights, np.float64), kind="stable"):
        open_packs = np.flatnonzero(items < rooms)
        chosen = open_packs[np.argmin((load[open_packs] + weights[item]) * costs[open_packs])]
        pack[item], rank[item] = chosen, items[chosen]
        load[chosen] += weights[item]
        items[chosen] += 1
    return pack, rank


def pack_evenly(weights: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """`pack` into num_packs packs of n / num_packs items each, all of cost 1."""
    if len(weights) % num_packs:
        raise ValueError(f"{len(weights)} items do not split evenly into {num_packs} packs")
    return pack(weights, np.full(num_packs, len(weights) // num_packs))


def routed_rooms(slots_per_device: int, device_cost: np.ndarray) -> np.ndarray:
    """[D] int: how many of each device's slots receive pairs, in proportion to its speed (1 / cost) and
    as many in all as the fastest device's slots allow (equal costs: every slot)."""
    share = 1 / np.asarray(device_cost, np.float64)
    share /= share.sum()
    total = min(int(np.floor(slots_per_device / share.max() + 1e-9)), slots_per_device * len(share))
    rooms = np.floor(share * total + 1e-9).astype(np.int64)
    for device in np.argsort(-(share * total - rooms), kind="stable")[: total - rooms.sum()]:
        rooms[device] += 1  # largest remainders first (a device at its slots has none left)
    return rooms


def replicate(loads: np.ndarray, num_slots: int) -> tuple[np.ndarray, np.ndarray]:
    """loads [n] -> (item of each slot [num_slots], replica rank of each slot [num_slots]): slots 0..n-1 hold
    the items themselves; each further slot replicates the item with the highest load per replica."""
    count = len(loads)
    if num_slots < count:
        raise ValueError(f"{num_slots} slots cannot hold {count} experts")
    item, rank = np.arange(num_slots), np.zeros(num_slots, np.int64)
    replicas = np.ones(count, np.int64)
    for slot in range(count, num_slots):
        hottest = int(np.argmax(loads / replicas))
        item[slot], rank[slot] = hottest, replicas[hottest]
        replicas[hottest] += 1
    return item, rank


@dataclasses.dataclass(frozen=True)
class Placement:
    """slot_expert [L, P]: the logical expert of each physical slot; replica_rank [L, P]: which of its
    expert's replicas a slot is (0..count-1); slot p lives on device p // (P / num_devices).
    routed_count [L, E]: an expert's pairs go to its replicas of rank < routed_count (None: all of them);
    the others are spares that receive none (speed-aware balancing)."""

    slot_expert: np.ndarray
    replica_rank: np.ndarray
    num_experts: int
    num_devices: int
    routed_count: np.ndarray | None = None

    def __post_init__(self):
        if self.routed_count is None:
            object.__setattr__(self, "routed_count", self.replica_count)

    @property
    def num_slots(self) -> int:
        return self.slot_expert.shape[1]

    @property
    def slot_device(self) -> np.ndarray:
        """[P] int: the device of each slot."""
        return np.arange(self.num_slots) // (self.num_slots // self.num_devices)

    @property
    def replica_count(self) -> np.ndarray:
        """[L, E]: replicas of each logical expert."""
        return np.stack([np.bincount(row, minlength=self.num_experts) for row in self.slot_expert])

    @property
    def slot_routed(self) -> np.ndarray:
        """[L, P] bool: whether a slot receives pairs (not a spare)."""
        return self.replica_rank < np.take_along_axis(self.routed_count, self.slot_expert, axis=1)

    def expert_slots(self) -> np.ndarray:
        """[L, E, max count] int: the slots of each expert's replicas, by replica rank; -1 pads."""
        layers = self.slot_expert.shape[0]
        slots = np.full((layers, self.num_experts, self.replica_count.max()), -1, np.int64)
        layer = np.repeat(np.arange(layers), self.num_slots)
        slots[layer, self.slot_expert.reshape(-1), self.replica_rank.reshape(-1)] = np.tile(
            np.arange(self.num_slots), layers
        )
        return slots

    def device_load(self, loads: np.ndarray) -> np.ndarray:
        """loads [L, E] -> [L, D]: each device's share when an expert's load splits evenly over its routed
        replicas."""
        per_slot = np.take_along_axis(loads / self.routed_count, self.slot_expert, axis=1) * self.slot_routed
        return per_slot.reshape(len(loads), self.num_devices, -1).sum(-1)

    def route(self, layer: int, topk_ids: np.ndarray) -> np.ndarray:
        """topk_ids [N, K] logical -> [N, K] physical slots at `layer`: token n's pair with expert e goes to
        e's replica n mod routed_count[e] (a fixed, load-oblivious spread, as a dispatcher without feedback)."""
        count = self.routed_count[layer][topk_ids]
        rank = np.arange(topk_ids.shape[0])[:, None] % count
        return self.expert_slots()[layer][topk_ids, rank]


def contiguous(num_layers: int, num_experts: int, num_devices: int) -> Placement:
    """No replicas, expert e on device e // (E / D): the block placement `shard_map` uses (the baseline)."""
    if num_experts % num_devices:
        raise ValueError(f"{num_experts} experts do not split evenly over {num_devices} devices")
    slots = np.tile(np.arange(num_experts), (num_layers, 1))
    return Placement(slots, np.zeros_like(slots), num_experts, num_devices)


def balance_layer(
    loads: np.ndarray, num_slots: int, num_groups: int, num_nodes: int, device_cost: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """loads [E] -> (slot_expert [P], replica_rank [P], routed_count [E]) for one layer, hierarchically
    (groups to nodes, replicas within nodes, replicas to devices: `routed_rooms` of each device's slots
    by its cost, then its spares)."""
    num_experts, num_devices = len(loads), len(device_cost)
    group_size = num_experts // num_groups
    node_pack, node_rank = pack_evenly(loads.reshape(num_groups, group_size).sum(-1), num_nodes)
    slots_per_node = num_slots // num_nodes
    slots_per_device = num_slots // num_devices
    devices_per_node = num_devices // num_nodes
    slot_expert, replica_rank = np.empty(num_slots, np.int64), np.empty(num_slots, np.int64)
    routed_count = np.empty(num_experts, np.int64)
    for node in range(num_nodes):
        groups = np.flatnonzero(node_pack == node)[np.argsort(node_rank[node_pack == node])]
        experts = (groups[:, None] * group_size + np.arange(group_size)).reshape(-1)  # this node's experts
        cost = device_cost[node * devices_per_node : (node + 1) * devices_per_node]
        rooms = routed_rooms(slots_per_device, cost)
        routed = rooms.sum()
        if routed < len(experts):
            enough = next(n for n in itertools.count(slots_per_device) if routed_rooms(n, cost).sum() >= len(experts))
            raise ValueError(
                f"{num_slots} slots route only {routed} replicas on a node at device costs "
                f"{np.round(cost, 2).tolist()}, fewer than its {len(experts)} experts: give at least "
                f"{enough * num_devices} slots"
            )
        item, rank = replicate(loads[experts].astype(np.float64), slots_per_node)  # the first `routed` route
        routed_items = item[:routed]
        replicas = np.bincount(routed_items, minlength=len(experts))
        device, position = pack(loads[experts][routed_items] / replicas[routed_items], rooms, cost)
        spare_device = np.repeat(np.arange(devices_per_node), slots_per_device - rooms)
        spare_position = np.concatenate([np.arange(r, slots_per_device) for r in rooms])
        device, position = np.concatenate([device, spare_device]), np.concatenate([position, spare_position])
        slot = node * slots_per_node + device * slots_per_device + position
        slot_expert[slot], replica_rank[slot] = experts[item], rank
        routed_count[experts] = replicas
    return slot_expert, replica_rank, routed_count


def balance(
    loads: np.ndarray,
    num_slots: int,
    num_devices: int,
    num_groups: int = 1,
    num_nodes: int = 1,
    device_cost: np.ndarray | None = None,
) -> Placement:
    """loads [L, E] (token counts) -> Placement of E experts in `num_slots` slots over `num_devices`.

    Hierarchical when `num_nodes` divides `num_groups` (each node keeps whole expert groups, so a token's
    group-limited pairs stay within few nodes), else global (one group, one node). num_slots must be a
    multiple of num_devices, num_devices of num_nodes, and E of num_groups. device_cost [D]: each device's
    time for the same routed work (None: all equal, the published algorithm); a slower device routes
    fewer of its slots (module doc).
    """
    loads = np.asarray(loads, np.float64)
    num_experts = loads.shape[1]
    if num_slots % num_devices or num_devices % num_nodes or num_experts % num_groups or num_slots < num_experts:
        raise ValueError(
            f"cannot place {num_experts} experts in {num_slots} slots on {num_devices} devices, {num_nodes} nodes, "
            f"{num_groups} groups: slots must be >= experts and a multiple of devices, devices of nodes, "
            "experts of groups"
        )
    device_cost = np.ones(num_devices) if device_cost is None else np.asarray(device_cost, np.float64)
    if device_cost.shape != (num_devices,) or not (np.isfinite(device_cost).all() and (device_cost > 0).all()):
        raise ValueError(f"device costs {device_cost.tolist()}: need {num_devices} positive numbers, one per device")
    if num_groups % num_nodes:
        num_groups = num_nodes = 1
    layers = [balance_layer(row, num_slots, num_groups, num_nodes, device_cost) for row in loads]
    slot_expert, replica_rank, routed_count = (np.stack(parts) for parts in zip(*layers, strict=True))
    return Placement(slot_expert, replica_rank, num_experts, num_devices, routed_count)
