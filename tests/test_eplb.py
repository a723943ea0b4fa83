"""EPLB placement (parallel/eplb.py): DeepSeek's published example, hand-checked cases and properties."""

from __future__ import annotations

import numpy as np
import pytest

from caee_jax.parallel import eplb

# The example of github.com/deepseek-ai/EPLB's README: 2 layers, 12 experts, 16 slots, 4 groups, 2 nodes, 8 GPUs.
README_LOADS = np.array(
    [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86], [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
)
README_SLOTS = np.array(
    [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1], [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]
)


def test_reproduces_the_published_example():
    placement = eplb.balance(README_LOADS, num_slots=16, num_devices=8, num_groups=4, num_nodes=2)
    np.testing.assert_array_equal(placement.slot_expert, README_SLOTS)


def test_pack_evenly_by_hand():
    # 2 packs of 3, heaviest first: 9 -> 0, 7 -> 1, 6 -> 1 (7 < 9), 5 -> 0 (9 < 13), 2 -> 1 (13 < 14),
    # 1 -> 0 (pack 1 is full)
    pack, rank = eplb.pack_evenly(np.array([5.0, 9.0, 2.0, 7.0, 6.0, 1.0]), 2)
    np.testing.assert_array_equal(pack, [0, 0, 1, 1, 1, 0])
    np.testing.assert_array_equal(rank, [1, 0, 2, 0, 1, 2])
    assert np.bincount(pack).tolist() == [3, 3]


def test_replicate_gives_extra_slots_to_the_highest_load_per_replica():
    item, rank = eplb.replicate(np.array([10.0, 40.0, 25.0]), 6)
    # slot 3: 40 is the highest load; slot 4: 25 > 40/2; slot 5: 40/2 > 25/2
    np.testing.assert_array_equal(item, [0, 1, 2, 1, 2, 1])
    np.testing.assert_array_equal(rank, [0, 0, 0, 1, 1, 2])


def test_route_spreads_an_experts_tokens_over_its_replicas():
    placement = eplb.balance(README_LOADS, num_slots=16, num_devices=8, num_groups=4, num_nodes=2)
    ids = np.array([[5, 10], [5, 10], [5, 0]])
    routed = placement.route(0, ids)
    assert (placement.slot_expert[0][routed] == ids).all()
    assert routed[0, 0] != routed[1, 0] and routed[0, 0] == routed[2, 0]  # expert 5 has 2 replicas


def skewed_loads(layers, experts, seed):
    rng = np.random.default_rng(seed)
    return rng.zipf(1.6, size=(layers, experts)).astype(np.float64) * rng.integers(1, 50, (layers, experts))


@pytest.mark.parametrize(("devices", "nodes", "groups", "slots"), [(8, 1, 8, 288), (16, 2, 8, 288), (32, 4, 8, 320)])
def test_properties_on_skewed_loads(devices, nodes, groups, slots):
    experts, layers = 256, 3
    loads = skewed_loads(layers, experts, seed=devices)
    placement = eplb.balance(loads, num_slots=slots, num_devices=devices, num_groups=groups, num_nodes=nodes)
    counts = placement.replica_count
    assert placement.slot_expert.shape == (layers, slots)
    assert (counts >= 1).all() and (counts.sum(1) == slots).all()
    assert (np.bincount(placement.slot_device, minlength=devices) == slots // devices).all()
    balanced = placement.device_load(loads).max(1)
    blocks = eplb.contiguous(layers, experts, devices).device_load(loads).max(1)
    assert (balanced <= blocks).all() and balanced.sum() < 0.8 * blocks.sum()
    np.testing.assert_allclose(placement.device_load(loads).sum(1), loads.sum(1))
    # hierarchical: every group's replicas lie on one node
    node = placement.slot_device // (devices // nodes)
    group = placement.slot_expert // (experts // groups)
    for layer in range(layers):
        for g in range(groups):
            assert len(set(node[group[layer] == g])) == 1


def test_global_when_nodes_do_not_divide_groups():
    loads = skewed_loads(2, 12, seed=1)
    placement = eplb.balance(loads, num_slots=18, num_devices=6, num_groups=4, num_nodes=3)
    assert (placement.replica_count.sum(1) == 18).all()
    assert placement.device_load(loads).max() <= eplb.contiguous(2, 12, 6).device_load(loads).max()


def test_refuses_impossible_shapes():
    with pytest.raises(ValueError, match="multiple of devices"):
        eplb.balance(README_LOADS, num_slots=15, num_devices=8)
    with pytest.raises(ValueError, match="slots must be >= experts"):
        eplb.balance(README_LOADS, num_slots=8, num_devices=8)


def test_routed_rooms_follow_each_devices_speed():
    np.testing.assert_array_equal(eplb.routed_rooms(4, np.ones(2)), [4, 4])  # equal costs: every slot
    np.testing.assert_array_equal(eplb.routed_rooms(24, np.array([1.0, 2.84])), [24, 8])  # 32 / 0.74 = 32.5 routed
    np.testing.assert_array_equal(eplb.routed_rooms(6, np.array([1.0, 2.0, 2.0])), [6, 3, 3])
    np.testing.assert_array_equal(eplb.routed_rooms(5, np.array([2.0, 1.0, 2.0])), [3, 5, 2])  # tie: lowest index


def test_speed_aware_balance_routes_less_to_a_slow_device_and_never_to_a_spare():
    experts, devices, slots = 32, 4, 64
    loads = skewed_loads(3, experts, seed=3)
    cost = np.array([1.0, 1.0, 3.0, 1.0])
    placement = eplb.balance(loads, slots, devices, device_cost=cost)
    assert (placement.replica_count.sum(1) == slots).all() and (placement.routed_count >= 1).all()
    routed_per_device = placement.slot_routed.reshape(3, devices, -1).sum(-1)
    np.testing.assert_array_equal(routed_per_device, np.tile(eplb.routed_rooms(slots // devices, cost), (3, 1)))
    unaware = eplb.balance(loads, slots, devices)
    assert ((placement.device_load(loads) * cost).max(1) < 0.8 * (unaware.device_load(loads) * cost).max(1)).all()
    np.testing.assert_allclose(placement.device_load(loads).sum(1), loads.sum(1))
    ids = np.random.default_rng(0).integers(0, experts, (257, 4))
    for layer in range(3):
        routed = placement.route(layer, ids)
        assert (placement.slot_expert[layer][routed] == ids).all() and placement.slot_routed[layer][routed].all()
    same = eplb.balance(loads, slots, devices, device_cost=np.ones(devices))
    np.testing.assert_array_equal(same.slot_expert, unaware.slot_expert)
    np.testing.assert_array_equal(same.routed_count, unaware.replica_count)


def test_speed_aware_balance_names_the_slots_it_needs():
    with pytest.raises(ValueError, match="route only 27 replicas .* give at least 48 slots"):
        eplb.balance(skewed_loads(1, 32, seed=1), 40, 2, device_cost=np.array([1.0, 2.84]))
    with pytest.raises(ValueError, match="need 2 positive numbers"):
        eplb.balance(skewed_loads(1, 32, seed=1), 64, 2, device_cost=np.array([1.0, 0.0]))
