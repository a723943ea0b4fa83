"""Router parity with transformers' DeepseekV3TopkRouter, plus the routing invariants the experts rely on."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import TINY_HF
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

from caee_jax.config import ModelConfig
from caee_jax.model.router import route

ROUTERS = {
    "grouped": dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4, norm_topk_prob=True),
    "grouped-unnormed": dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4, norm_topk_prob=False),
    "wide": dict(n_routed_experts=64, n_group=8, topk_group=3, num_experts_per_tok=6, norm_topk_prob=True),
    # K equals the experts of the single kept group: the group choice alone decides the ids.
    "one-group-kept": dict(n_routed_experts=12, n_group=3, topk_group=1, num_experts_per_tok=4, norm_topk_prob=True),
    # Every group kept: group limiting must be a no-op.
    "all-groups-kept": dict(n_routed_experts=16, n_group=4, topk_group=4, num_experts_per_tok=5, norm_topk_prob=True),
    "ungrouped": dict(n_routed_experts=13, n_group=1, topk_group=1, num_experts_per_tok=3, norm_topk_prob=False),
    "ungrouped-normed": dict(n_routed_experts=13, n_group=1, topk_group=1, num_experts_per_tok=3, norm_topk_prob=True),
}

BIAS_SCALE = 0.2  # comparable to the spread of sigmoid scores, so the bias really moves the selection


def setup(name: str, tokens: int, bias_scale: float, seed: int = 0):
    """(our config, transformers router, x [N, D], our weight [D, E], bias [E]), all float32."""
    raw = {**TINY_HF, **ROUTERS[name]}
    config = ModelConfig.from_hf(raw)
    rng = np.random.default_rng(seed)
    d, e = config.hidden_size, config.n_routed_experts
    x = rng.standard_normal((tokens, d), dtype=np.float32)
    weight = (rng.standard_normal((d, e)) / np.sqrt(d)).astype(np.float32)
    bias = (bias_scale * rng.standard_normal(e)).astype(np.float32)
    router = DeepseekV3TopkRouter(DeepseekV3Config(**raw))
    with torch.no_grad():
        router.weight.copy_(torch.from_numpy(weight.T))
        router.e_score_correction_bias.copy_(torch.from_numpy(bias))
    return config, router, x, weight, bias


def by_expert(ids: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Slots sorted by expert id, so routings that list the same experts in another order compare equal."""
    order = np.argsort(ids, axis=-1)
    return np.take_along_axis(ids, order, -1), np.take_along_axis(weights, order, -1)


def our_route(config, x, weight, bias) -> tuple[np.ndarray, np.ndarray]:
    ids, weights = route(jnp.asarray(x), jnp.asarray(weight), jnp.asarray(bias), config)
    return np.asarray(ids), np.asarray(weights)


@pytest.mark.parametrize("bias_scale", [0.0, BIAS_SCALE], ids=["no-bias", "bias"])
@pytest.mark.parametrize("tokens", [1, 7, 64])
@pytest.mark.parametrize("name", ROUTERS)
def test_route_matches_transformers(name, tokens, bias_scale):
    config, router, x, weight, bias = setup(name, tokens, bias_scale)
    ids, weights = our_route(config, x, weight, bias)
    with torch.no_grad():
        _, ref_weights, ref_ids = router(torch.from_numpy(x))
    ids, weights = by_expert(ids, weights)
    ref_ids, ref_weights = by_expert(ref_ids.numpy(), ref_weights.numpy())
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(weights, ref_weights, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ROUTERS)
def test_bias_steers_selection_only(name):
    """The bias must change which experts win, while gate weights stay the un-biased sigmoid scores."""
    config, _, x, weight, bias = setup(name, 64, BIAS_SCALE)
    ids, weights = our_route(config, x, weight, bias)
    unbiased_ids, _ = our_route(config, x, weight, np.zeros_like(bias))
    assert (np.sort(ids, -1) != np.sort(unbiased_ids, -1)).any(), "the bias never changed the selection"

    scores = 1 / (1 + np.exp(-(x.astype(np.float64) @ weight)))
    expected = np.take_along_axis(scores, ids, -1)
    if config.norm_topk_prob:
        expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(weights, expected * config.routed_scaling_factor, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ROUTERS)
def test_routing_invariants(name):
    """int32 ids in [0, E), K distinct per token, all from the top-`topk_group` groups, slots by descending score."""
    config, _, x, weight, bias = setup(name, 64, BIAS_SCALE, seed=1)
    ids, _ = our_route(config, x, weight, bias)
    e, k = config.n_routed_experts, config.num_experts_per_tok
    assert ids.dtype == np.int32 and ids.shape == (64, k)
    assert ((ids >= 0) & (ids < e)).all()
    assert all(len(set(row)) == k for row in ids)

    choice = 1 / (1 + np.exp(-(x.astype(np.float64) @ weight))) + bias
    group_scores = np.sort(choice.reshape(64, config.n_group, -1), -1)[..., -2:].sum(-1)
    top_groups = np.argsort(-group_scores, -1)[:, : config.topk_group]
    for row, groups in zip(ids // config.experts_per_group, top_groups, strict=True):
        assert set(row) <= set(groups)
    assert (np.diff(np.take_along_axis(choice, ids, -1), axis=-1) <= 0).all()
