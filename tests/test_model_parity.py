"""Whole-model numerical parity with transformers' DeepseekV3ForCausalLM on tiny random weights."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import random_tokens
from flax import nnx

import caee_jax
from caee_jax.model.cache import LatentCache

ATOL = 1e-4  # fp32 logits, max abs diff (fixed; never relaxed)

CONFIGS = {
    "qlora-yarn-groups": {},
    "no-qlora-no-yarn-no-norm-topk-all-moe": dict(
        q_lora_rank=None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        norm_topk_prob=False,
        first_k_dense_replace=0,
        n_group=1,
        topk_group=1,
    ),
    "more-experts-topk6-two-dense": dict(
        n_routed_experts=24,
        num_experts_per_tok=6,
        n_group=8,
        topk_group=3,
        first_k_dense_replace=2,
        num_hidden_layers=4,
        n_shared_experts=2,
    ),
    "no-interleave-topk1-no-shared-tied": dict(
        rope_interleave=False,
        num_experts_per_tok=1,
        n_shared_experts=0,
        tie_word_embeddings=True,
    ),
    "all-dense": dict(first_k_dense_replace=3),
}


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(hf_checkpoint, name):
    directory, reference = hf_checkpoint(seed=3, **CONFIGS[name])
    tokens = random_tokens(reference.config.vocab_size, (2, 13), seed=1)
    expected = hf_logits(reference, tokens)
    for backend in ("loop", "dense"):
        ours = np.asarray(caee_jax.load(directory, execution=backend)(tokens))
        assert ours.dtype == np.float32 and ours.shape == expected.shape
        np.testing.assert_allclose(ours, expected, atol=ATOL, rtol=0, err_msg=f"{name} / {backend}")


@pytest.mark.parametrize("name", ["qlora-yarn-groups", "no-qlora-no-yarn-no-norm-topk-all-moe"])
def test_decoding_with_latent_cache_equals_full_sequence(hf_checkpoint, name):
    """Token-by-token decode (absorbed attention over the latent cache) gives the full pass's logits."""
    directory, _ = hf_checkpoint(seed=5, **CONFIGS[name])
    model = caee_jax.load(directory)
    tokens = random_tokens(model.config.vocab_size, (3, 11), seed=2)
    full = np.asarray(model(tokens))
    step = nnx.jit(lambda module, token, position, cache: module(token, position, cache))  # one compile
    cache = LatentCache.zeros(model.config, 3, 16)
    for t in range(tokens.shape[1]):
        positions = jnp.full((3, 1), t, jnp.int32)
        out = step(model.module, jnp.asarray(tokens[:, t : t + 1]), positions, cache)
        cache = out.cache
        np.testing.assert_allclose(np.asarray(out.logits[:, 0]), full[:, t], atol=ATOL, rtol=0, err_msg=f"step {t}")
    assert cache.moe.shape[-1] == model.config.kv_lora_rank + model.config.qk_rope_head_dim


def test_bfloat16_parameters_track_float32(hf_checkpoint):
    directory, reference = hf_checkpoint(seed=7)
    tokens = random_tokens(reference.config.vocab_size, (2, 9), seed=3)
    f32 = np.asarray(caee_jax.load(directory)(tokens))
    bf16_model = caee_jax.load(directory, dtype="bfloat16")
    assert bf16_model.dtype == jnp.bfloat16
    bf16 = np.asarray(bf16_model(tokens))
    assert bf16.dtype == np.float32
    # bf16 keeps 8 mantissa bits: relative error ~ 2^-8 per op, accumulated over a few layers.
    scale = np.abs(f32).max()
    assert np.abs(bf16 - f32).max() < 0.05 * scale
