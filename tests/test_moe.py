"""Our MoE layer against transformers' DeepseekV3MoE with the same weights: output and routing."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import TINY_HF, make_hf_model
from flax import nnx

from caee_jax.config import ModelConfig
from caee_jax.experts import ExpertBackend
from caee_jax.model.execution import Execution
from caee_jax.model.moe import MoE

VARIANTS = {
    "tiny": {},  # grouped routing (4 groups, 2 kept), normalised weights, one shared expert
    "ungrouped": dict(n_routed_experts=11, n_group=1, topk_group=1, norm_topk_prob=False, n_shared_experts=2),
}


def numpy_of(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().numpy()


def copy_moe(hf_moe, config: ModelConfig) -> MoE:
    """Our MoE holding hf_moe's weights. transformers 5's runtime module keeps the experts fused:
    gate_up_proj [E, 2F, D] (gate rows first) and down_proj [E, D, F]; ours are [E, D, F] and [E, F, D]."""
    moe = MoE(config, jnp.float32, rngs=nnx.Rngs(0))
    f = config.moe_intermediate_size
    gate_up = numpy_of(hf_moe.experts.gate_up_proj)
    moe.gate_proj[...] = gate_up[:, :f].transpose(0, 2, 1)
    moe.up_proj[...] = gate_up[:, f:].transpose(0, 2, 1)
    moe.down_proj[...] = numpy_of(hf_moe.experts.down_proj).transpose(0, 2, 1)
    moe.router[...] = numpy_of(hf_moe.gate.weight).T
    moe.router_bias[...] = numpy_of(hf_moe.gate.e_score_correction_bias)
    for name in ("gate_proj", "up_proj", "down_proj"):
        getattr(moe.shared, name)[...] = numpy_of(getattr(hf_moe.shared_experts, name).weight).T
    return moe


@pytest.fixture(scope="module", params=list(VARIANTS))
def layer(request):
    """(transformers MoE from layer 1 of a random model, our copy, input x [B, T, D])."""
    overrides = VARIANTS[request.param]
    hf_moe = make_hf_model(seed=3, **overrides).model.layers[1].mlp
    moe = copy_moe(hf_moe, ModelConfig.from_hf({**TINY_HF, **overrides}))
    x = np.random.default_rng(0).standard_normal((2, 5, TINY_HF["hidden_size"]), dtype=np.float32)
    return hf_moe, moe, x


@pytest.mark.parametrize("backend", [ExpertBackend.LOOP, ExpertBackend.DENSE], ids=["loop", "dense"])
def test_moe_matches_transformers(layer, backend):
    hf_moe, moe, x = layer
    y, routing = moe(jnp.asarray(x), Execution(backend))
    with torch.no_grad():
        expected = numpy_of(hf_moe(torch.from_numpy(x)))
        _, ref_weights, ref_ids = hf_moe.gate(torch.from_numpy(x))
    # Routing first: an output mismatch is only meaningful once the same experts were chosen.
    ids, weights = np.asarray(routing.topk_ids), np.asarray(routing.topk_weights)
    k = moe.config.num_experts_per_tok
    assert ids.shape == weights.shape == (*x.shape[:2], k)
    order, ref_order = np.argsort(ids.reshape(-1, k), -1), np.argsort(ref_ids.numpy(), -1)
    np.testing.assert_array_equal(
        np.take_along_axis(ids.reshape(-1, k), order, -1), np.take_along_axis(ref_ids.numpy(), ref_order, -1)
    )
    np.testing.assert_allclose(
        np.take_along_axis(weights.reshape(-1, k), order, -1),
        np.take_along_axis(ref_weights.numpy(), ref_order, -1),
        rtol=0,
        atol=1e-6,
    )
    # Outputs are ~1e-3 (transformers' 0.02-std init), so the fp32 tolerance is 1e-5 of the output scale.
    np.testing.assert_allclose(np.asarray(y), expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_routed_experts_matter(layer):
    """Guards against vacuity: without the routed experts (shared only) the output must differ visibly."""
    hf_moe, moe, x = layer
    with torch.no_grad():
        full = numpy_of(hf_moe(torch.from_numpy(x)))
        shared_only = numpy_of(hf_moe.shared_experts(torch.from_numpy(x)))
    assert np.abs(full - shared_only).max() > 1e-3 * np.abs(full).max()
