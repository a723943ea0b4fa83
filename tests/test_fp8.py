"""FP8 block-scaled weights: dequantisation bit-exact with DeepSeek's reference, and FP8 HF directories load."""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import make_hf_model, random_tokens
from safetensors.numpy import load_file

import caee_jax
from caee_jax.routing.storage import block_quantize
from caee_jax.weights.fp8 import FP8_DTYPE, dequantize
from checkpoints_tools.fp8_checkpoint import quantize, write_release_checkpoint


def reference_weight_dequant(weight: np.ndarray, scale_inv: np.ndarray, block, dtype) -> np.ndarray:
    """DeepSeek's `weight_dequant` transcribed to torch: each element times its bm x bn block's scale,
    multiplied in float32 (partial edge blocks included), then stored in the output dtype; returned as raw
    bits (numpy has no bfloat16)."""
    m, n = weight.shape
    x = torch.from_numpy(weight.view(np.uint8).copy()).view(torch.float8_e4m3fn)
    s = torch.from_numpy(scale_inv)
    y = torch.empty(m, n, dtype=dtype)
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            rows, cols = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            y[rows, cols] = (x[rows, cols].to(torch.float32) * s[i, j]).to(dtype)
    return y.view(torch.int16 if dtype == torch.bfloat16 else torch.int32).numpy()


@pytest.mark.parametrize(
    "shape, block", [((300, 200), (128, 128)), ((7, 129), (128, 128)), ((256, 128), (128, 128)), ((45, 70), (16, 32))]
)
def test_dequantize_is_bit_exact_with_the_reference(shape, block):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, shape, dtype=np.uint8)
    raw[(raw & 0x7F) == 0x7F] = 0  # no NaNs (e4m3fn's only non-finite values)
    weight = raw.view(FP8_DTYPE)
    scale = rng.uniform(1e-5, 1e-1, (-(-shape[0] // block[0]), -(-shape[1] // block[1]))).astype(np.float32)
    for ours, theirs in ((np.float32, torch.float32), (ml_dtypes.bfloat16, torch.bfloat16)):
        got = dequantize(weight, scale, ours, block)
        expected = reference_weight_dequant(weight, scale, block, theirs)
        assert got.dtype == np.dtype(ours) and got.shape == shape
        np.testing.assert_array_equal(got.view(expected.dtype), expected)


def test_quantize_then_dequantize_is_within_e4m3_rounding():
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((200, 300)).astype(np.float32) * np.linspace(0.01, 1, 300, dtype=np.float32)
    quantized, scale = quantize(weight)
    assert quantized.dtype == FP8_DTYPE and scale.shape == (2, 3) and scale.dtype == np.float32
    restored = dequantize(quantized, scale)
    block_scale = np.repeat(np.repeat(scale, 128, 0), 128, 1)[:200, :300]
    # e4m3: 3 mantissa bits (relative step 2^-3, so rounding error <= 2^-4 of |w|), subnormal step 2^-9
    bound = np.maximum(np.abs(weight) * 2.0**-4, block_scale * 2.0**-10) * (1 + 1e-6)
    assert np.all(np.abs(restored - weight) <= bound)
    np.testing.assert_array_equal(np.abs(quantized.astype(np.float32)).max(), 448.0)


def test_fp8_directory_loads_within_fp8_error_of_the_original(tmp_path):
    """DeepSeek's layout (16x16 blocks here, so tiny weights span several blocks with partial edges):
    every FP8 weight loads as its exact dequantisation, and logits stay close to the unquantised model."""
    reference = make_hf_model(seed=5)
    reference.save_pretrained(tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    with open(tmp_path / "hf" / "config.json") as f:
        config = json.load(f)
    fp8_dir = str(tmp_path / "fp8")
    write_release_checkpoint(fp8_dir, tensors, config, num_shards=2, block=(16, 16))
    with open(os.path.join(fp8_dir, "model.safetensors.index.json")) as f:
        assert any(n.endswith("weight_scale_inv") for n in json.load(f)["weight_map"])

    loaded = caee_jax.load(fp8_dir)
    name = "model.layers.2.mlp.experts.7.down_proj.weight"  # [48, 20]: 3 x 2 blocks, the right ones partial
    quantized, scale = quantize(tensors[name], (16, 16))
    np.testing.assert_array_equal(
        np.asarray(loaded.module.moe_layers.ffn.down_proj[...])[1, 7], dequantize(quantized, scale, block=(16, 16)).T
    )
    tokens = random_tokens(131, (2, 9), seed=2)
    with torch.no_grad():
        expected = reference(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    got = np.asarray(loaded(tokens))
    assert np.abs(got - expected).max() < 0.05 * np.abs(expected).max()


def test_an_fp8_release_loads_with_fp8_experts_keeping_its_bytes_and_scales(tmp_path):
    """load(weights="fp8") of a release (128x128 blocks) holds each routed expert's FP8 bytes and scales
    as stored (transposed to [in, out]) and computes what the dequantising load computes."""
    reference = make_hf_model(seed=5)
    reference.save_pretrained(tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    with open(tmp_path / "hf" / "config.json") as f:
        config = json.load(f)
    fp8_dir = str(tmp_path / "fp8")
    write_release_checkpoint(fp8_dir, tensors, config, num_shards=2)
    kept = caee_jax.load(fp8_dir, weights="fp8")
    assert kept.weights == "fp8"
    ffn = kept.module.moe_layers.ffn
    name = "model.layers.2.mlp.experts.7.down_proj.weight"  # layer 2 = MoE stack index 1
    quantized, scale = quantize(tensors[name])
    np.testing.assert_array_equal(np.asarray(ffn.down_proj[...])[1, 7].view(np.uint8), quantized.T.view(np.uint8))
    np.testing.assert_array_equal(np.asarray(ffn.down_scale[...])[1, 7], scale.T)
    tokens = random_tokens(131, (2, 9), seed=2)
    dequantised = caee_jax.load(fp8_dir)
    np.testing.assert_allclose(np.asarray(kept(tokens)), np.asarray(dequantised(tokens)), atol=1e-5, rtol=0)


def test_block_quantize_of_the_runtime_equals_the_release_writer():
    weight = np.random.default_rng(3).normal(0, 0.05, (2, 300, 140)).astype(np.float32)
    q, scale = block_quantize(weight)
    for i in range(2):
        want_q, want_scale = quantize(weight[i])
        np.testing.assert_array_equal(np.asarray(q[i]).view(np.uint8), want_q.view(np.uint8))
        np.testing.assert_array_equal(np.asarray(scale[i]), want_scale)
