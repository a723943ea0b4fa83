"""RoPE / YaRN parity with transformers' DeepseekV3: frequency tables, magnitude, rotations, softmax scale."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import TINY_HF
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_ds

from caee_jax.config import ModelConfig, YarnScaling
from caee_jax.model.rope import apply_rope, inverse_frequencies

# (rotary dim, rope_theta, YaRN parameters or None for plain RoPE). Each case moves a different part of YaRN.
CASES = {
    "r1": (64, 10000.0, dict(factor=40.0, original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=1.0)),
    "v2-lite-mscales": (
        64,
        10000.0,
        dict(factor=40.0, original_max_position_embeddings=4096, mscale=0.707, mscale_all_dim=0.707),
    ),
    # mscale_all_dim=0: cos/sin carry mscale(factor) and the softmax scale stays qk_head_dim**-0.5.
    "mscale-only": (8, 10000.0, dict(factor=4.0, original_max_position_embeddings=64, mscale=1.0, mscale_all_dim=0.0)),
    # Unequal mscales: a magnitude != 1 *and* a rescaled softmax.
    "unequal-mscales": (
        16,
        10000.0,
        dict(factor=8.0, original_max_position_embeddings=128, mscale=0.5, mscale_all_dim=1.0),
    ),
    "betas-theta": (
        32,
        50000.0,
        dict(
            factor=16.0,
            original_max_position_embeddings=512,
            beta_fast=16.0,
            beta_slow=2.0,
            mscale=1.0,
            mscale_all_dim=0.5,
        ),
    ),
    "no-truncate": (8, 10000.0, dict(factor=4.0, original_max_position_embeddings=64, truncate=False)),
    "attention-factor": (
        8,
        10000.0,
        dict(factor=4.0, original_max_position_embeddings=64, attention_factor=0.9, mscale_all_dim=1.0),
    ),
    # original_max_position_embeddings so small that both correction bounds clamp to 0 (low == high).
    "degenerate-ramp": (8, 10000.0, dict(factor=2.0, original_max_position_embeddings=4)),
    "off-8": (8, 10000.0, None),
    "off-64": (64, 10000.0, None),
}

# Positions within (and around) a short context, and far beyond it: at position p a frequency error d
# becomes an angle error p*d, so long positions expose table differences that short ones hide.
SHORT = np.array([[0, 1, 2, 5, 17, 31, 63], [3, 4, 8, 9, 40, 50, 62]])
LONG = np.array([[0, 1, 4095, 4096, 40000, 100000, 163839], [7, 12345, 65536, 99999, 100001, 131072, 150000]])


def configs(name: str, interleave: bool = True) -> tuple[ModelConfig, DeepseekV3Config]:
    """Ours and transformers' config for a CASES entry, identical in every rope-relevant field."""
    dim, theta, yarn = CASES[name]
    if yarn is None:
        params, scaling = {"rope_type": "default", "rope_theta": theta}, None
        max_pos = TINY_HF["max_position_embeddings"]
    else:
        params, scaling = {"rope_type": "yarn", "rope_theta": theta, **yarn}, YarnScaling(**yarn)
        max_pos = int(yarn["factor"] * yarn["original_max_position_embeddings"])
    common = dict(qk_rope_head_dim=dim, max_position_embeddings=max_pos, rope_interleave=interleave)
    ours = ModelConfig.from_hf(TINY_HF).replace(rope_theta=theta, rope_scaling=scaling, **common)
    hf = DeepseekV3Config(**{**TINY_HF, **common, "rope_parameters": params})
    return ours, hf


@pytest.mark.parametrize("name", CASES)
def test_inverse_frequencies_match_transformers(name):
    """DeepseekV3RotaryEmbedding builds its table with ROPE_INIT_FUNCTIONS[rope_type] (or the default rule)."""
    ours, hf = configs(name)
    reference = hf_ds.DeepseekV3RotaryEmbedding(hf)
    inv_freq, magnitude = inverse_frequencies(ours)
    assert inv_freq.dtype == np.float32 and inv_freq.shape == (ours.qk_rope_head_dim // 2,)
    # Relative: the lowest frequencies are ~1e-6, where any absolute tolerance would be vacuous.
    np.testing.assert_allclose(inv_freq, reference.inv_freq.numpy(), rtol=1e-5, atol=0)
    assert magnitude == pytest.approx(reference.attention_scaling, rel=1e-12)


def test_cases_exercise_yarn():
    """Guards the table test against vacuity: YaRN must move frequencies and, in some cases, the magnitude."""
    ours, _ = configs("r1")
    plain, _ = inverse_frequencies(ours.replace(rope_scaling=None))
    scaled, _ = inverse_frequencies(ours)
    assert scaled[0] == plain[0] and scaled[-1] == pytest.approx(plain[-1] / 40, rel=1e-6)
    assert inverse_frequencies(configs("mscale-only")[0])[1] == pytest.approx(0.1 * np.log(4.0) + 1)


@pytest.mark.parametrize("interleave", [True, False], ids=["interleave", "half"])
@pytest.mark.parametrize("positions", [SHORT, LONG], ids=["short", "long"])
@pytest.mark.parametrize("name", CASES)
def test_apply_rope_matches_transformers(name, positions, interleave):
    """Queries [B, T, H, P] and the shared MLA key [B, T, P] rotate as apply_rotary_pos_emb(_interleave)."""
    ours, hf = configs(name, interleave)
    dim = ours.qk_rope_head_dim
    rng = np.random.default_rng(0)
    q = rng.standard_normal((*positions.shape, 3, dim), dtype=np.float32)
    k = rng.standard_normal((*positions.shape, dim), dtype=np.float32)

    cos, sin = hf_ds.DeepseekV3RotaryEmbedding(hf)(torch.from_numpy(q), torch.from_numpy(positions))
    rotate = hf_ds.apply_rotary_pos_emb_interleave if interleave else hf_ds.apply_rotary_pos_emb
    q_ref, k_ref = rotate(torch.from_numpy(q), torch.from_numpy(k[:, :, None]), cos, sin, unsqueeze_dim=2)

    for x, expected in ((q, q_ref), (k, k_ref[:, :, 0])):
        actual = apply_rope(jnp.asarray(x), jnp.asarray(positions), ours)
        np.testing.assert_allclose(np.asarray(actual), expected.numpy(), rtol=0, atol=1e-5)


def test_missing_mscale_follows_transformers():
    """A transformers-5 config may omit `mscale`: transformers then treats it as unset (magnitude
    mscale(factor)), not as 1.0 (which would make the magnitude mscale(factor, 1) / mscale(factor, all_dim))."""
    params = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
    raw = {**TINY_HF, "rope_parameters": {**params, "mscale_all_dim": 1.0}}
    reference = hf_ds.DeepseekV3RotaryEmbedding(DeepseekV3Config(**raw))
    assert inverse_frequencies(ModelConfig.from_hf(raw))[1] == pytest.approx(reference.attention_scaling, rel=1e-12)


@pytest.mark.parametrize("name", CASES)
def test_softmax_scale_matches_transformers(name):
    ours, hf = configs(name)
    assert ours.softmax_scale == pytest.approx(hf_ds.DeepseekV3Attention(hf, layer_idx=0).scaling, rel=1e-12)
