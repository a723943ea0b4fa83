"""The fixed-capacity backend (training path): equal to dense when nothing overflows; drops an
overflowing expert's lowest-weight pairs; differentiable."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from caee_jax.experts import ExpertWeights, run_experts
from caee_jax.experts.capacity import capacity_for, run_capacity


def setup(num_tokens=29, dim=12, width=7, experts=6, k=2, seed=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(keys[0], (num_tokens, dim))
    weights = ExpertWeights(
        jax.random.normal(keys[1], (experts, dim, width)),
        jax.random.normal(keys[2], (experts, dim, width)),
        jax.random.normal(keys[3], (experts, width, dim)),
    )
    ids = jnp.argsort(jax.random.normal(keys[4], (num_tokens, experts)), axis=1)[:, :k].astype(jnp.int32)
    gates = jax.random.uniform(keys[4], (num_tokens, k), minval=0.1)
    return x, ids, gates, jnp.ones(ids.shape, bool), weights


def test_equals_dense_when_capacity_suffices():
    x, ids, gates, keep, weights = setup()
    dense = run_experts(x, ids, gates, keep, weights, "dense")
    big = run_experts(x, ids, gates, keep, weights, "capacity", capacity_factor=100.0)
    np.testing.assert_allclose(big, dense, atol=1e-4 * float(jnp.abs(dense).max()), rtol=0)


def test_overflow_drops_lowest_weight_pairs():
    x, _, gates, keep, weights = setup(num_tokens=10, k=1)
    ids = jnp.zeros((10, 1), jnp.int32)  # every token on expert 0, capacity 4
    out = run_capacity(x, ids, gates, keep, weights, capacity=4)
    kept = gates[:, 0] >= jnp.sort(gates[:, 0])[-4]
    expected = run_experts(x, ids, gates, kept[:, None], weights, "dense")
    np.testing.assert_allclose(out, expected, atol=1e-4 * float(jnp.abs(expected).max()), rtol=0)


def test_capacity_for_bounds():
    assert capacity_for(16, 8, 64, 1.0) == 2
    assert capacity_for(16, 8, 64, 2.0) == 4
    assert capacity_for(1, 8, 64, 1.0) == 1
    assert capacity_for(4, 8, 2, 10.0) == 4


def test_gradients_reach_router_weights_and_experts():
    x, ids, gates, keep, weights = setup()

    def loss(gates, weights):
        return jnp.sum(run_experts(x, ids, gates, keep, weights, "capacity") ** 2)

    grad_gates, grad_weights = jax.grad(loss, argnums=(0, 1))(gates, weights)
    assert float(jnp.abs(grad_gates).sum()) > 0
    assert all(float(jnp.abs(g).sum()) > 0 for g in grad_weights)
