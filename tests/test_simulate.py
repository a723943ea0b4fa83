"""R1-at-scale simulation (eval/simulate.py, eval/r1_costs.py) on synthetic skewed routing."""

from __future__ import annotations

import numpy as np
import pytest

from caee_jax.caee.cost_table import CostTable, DeviceCosts, FitQuality, MeshSignature
from caee_jax.eval import r1_costs, simulate


def small_routing(layers=2, tokens=1024, experts=32, top_k=4, seed=0):
    """Zipf-skewed routing of a 32-expert top-4 model: ids [L, M, 4] distinct per token, weights summing to 1."""
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, experts + 1) ** 1.2
    layer_popularity = [rng.permutation(popularity) / popularity.sum() for _ in range(layers)]
    ids = np.stack([[rng.choice(experts, top_k, replace=False, p=p) for _ in range(tokens)] for p in layer_popularity])
    weights = rng.dirichlet(np.ones(top_k), size=(layers, tokens)).astype(np.float32)
    return ids, weights


def test_r1_routing_keeps_blocks_mass_and_distinct_experts():
    ids, weights = small_routing()
    r1_ids, r1_weights = simulate.r1_routing(ids, weights, small_experts=32)
    assert r1_ids.shape == (2, 1024, 8) and r1_weights.shape == (2, 1024, 8)
    assert ((r1_ids >= 0) & (r1_ids < 256)).all()
    np.testing.assert_array_equal(np.sort(r1_ids // 8, -1), np.sort(np.repeat(ids, 2, -1), -1))  # blocks kept
    assert all(len(set(row)) == 8 for row in r1_ids.reshape(-1, 8))
    np.testing.assert_allclose(r1_weights.sum(-1), weights.sum(-1), rtol=1e-5)


def test_device_models_state_their_numbers():
    assert r1_costs.H100.activation_s == pytest.approx(3 * 7168 * 2048 / 3.35e12)
    assert r1_costs.H200.activation_s < r1_costs.H100.activation_s
    small = MeshSignature("cpu", "cpu", 1, 1, "data=1,expert=1,tensor=1", 256, 256, 32, 4, "float32", "loop")
    device = DeviceCosts(1e-4, 4e-6, 2e-5, (0.0, 0.0, 0.0), 1e-6)
    cpu = CostTable(small, (device,), (0,) * 32, FitQuality(1, 1.0, 0.0, 0.0, 0.0))
    scaled = r1_costs.scaled_cpu(cpu)
    assert scaled.activation_s == pytest.approx(2e-5 * 112)  # bf16 R1 expert / float32 256x256 expert
    assert scaled.pair_s == pytest.approx(4e-6 * 224) and scaled.fixed_s == 1e-4
    table = r1_costs.r1_table(r1_costs.H100, np.arange(288) // 36, 8)
    assert table.num_devices == 8 and table.signature.n_routed_experts == 288


def test_eplb_balances_and_caee_cuts_the_slowest_device():
    ids, weights = small_routing(layers=1, tokens=2048)
    r1_ids, r1_weights = simulate.r1_routing(ids, weights, small_experts=32)
    results = {r.method: r for r in simulate.simulate(r1_ids, r1_weights, r1_costs.H100, 8, batch=512, steps=2)}
    assert list(results) == list(simulate.METHODS)
    assert results["eplb"].imbalance < results["contiguous"].imbalance
    assert results["caee"].layer_s <= results["contiguous"].layer_s
    assert results["eplb+caee"].layer_s <= results["eplb"].layer_s
    assert results["contiguous"].pruned_pairs == 0 and 0 < results["caee"].pruned_pairs < 0.5
