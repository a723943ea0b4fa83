"""Writing checkpoints in DeepSeek's released layout, for tests and benchmarks (the inverse of `weights/fp8.py`).

The release stores the linear weights inside decoder layers as float8_e4m3fn with a float32
`weight_scale_inv` per 128x128 block (scale = block amax / 448, e4m3's largest finite value, so the
block's largest weight maps to 448), everything else in bfloat16 except the router's
`e_score_correction_bias` (float32), spread over `model-0000i-of-0000n.safetensors` shards listed in
`model.safetensors.index.json`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from caee_jax.weights.fp8 import BLOCK, FP8_DTYPE, scale_shape
from caee_jax.weights.hf_layout import may_be_fp8
from caee_jax.weights.hf_source import SCALE_SUFFIX
from caee_jax.weights.safetensors_io import INDEX_NAME

E4M3_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448


def quantize(weight: np.ndarray, block: tuple[int, int] = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """float [M, N] -> (float8_e4m3fn [M, N], weight_scale_inv float32 [ceil(M/bm), ceil(N/bn)])."""
    weight = np.asarray(weight, np.float32)
    (m, n), (bm, bn) = weight.shape, block
    mb, nb = scale_shape(weight.shape, block)
    padded = np.zeros((mb * bm, nb * bn), np.float32)
    padded[:m, :n] = weight
    blocks = padded.reshape(mb, bm, nb, bn)
    amax = np.abs(blocks).max(axis=(1, 3))
    scale = np.where(amax > 0, amax / E4M3_MAX, 1.0).astype(np.float32)
    quantized = (blocks / scale[:, None, :, None]).reshape(mb * bm, nb * bn)[:m, :n]
    return np.ascontiguousarray(quantized.astype(FP8_DTYPE)), scale


def release_tensors(tensors: dict[str, np.ndarray], block: tuple[int, int] = BLOCK) -> dict[str, np.ndarray]:
    """HF tensors as the release stores them: FP8 + scale where DeepSeek quantises, bf16 or float32 elsewhere."""
    out = {}
    for name, tensor in tensors.items():
        if may_be_fp8(name):
            out[name], out[name + SCALE_SUFFIX] = quantize(tensor, block)
        elif name.endswith("e_score_correction_bias"):
            out[name] = np.asarray(tensor, np.float32)
        else:
            out[name] = np.asarray(tensor).astype(ml_dtypes.bfloat16)
    return out


def write_shards(directory: str, shards: Iterable[dict[str, np.ndarray]], num_shards: int) -> None:
    """Writes `num_shards` shard files (one dict of tensors each, consumed one at a time) and the index."""
    weight_map, total, count = {}, 0, 0
    for count, tensors in enumerate(shards, start=1):
        shard = f"model-{count:05d}-of-{num_shards:05d}.safetensors"
        save_file(tensors, os.path.join(directory, shard))
        weight_map.update({name: shard for name in tensors})
        total += sum(t.nbytes for t in tensors.values())
    if count != num_shards:
        raise ValueError(f"got {count} shards, expected {num_shards}")
    with open(os.path.join(directory, INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def write_config(directory: str, config: dict, block: tuple[int, int] = BLOCK) -> None:
    """config.json with DeepSeek's `quantization_config`."""
    quantization = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": list(block),
    }
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({**config, "quantization_config": quantization}, f, indent=2)


def write_release_checkpoint(
    directory: str, tensors: dict[str, np.ndarray], config: dict, num_shards: int = 3, block: tuple[int, int] = BLOCK
) -> None:
    """A complete FP8 checkpoint directory (config.json, shards, index) from float HF tensors."""
    os.makedirs(directory, exist_ok=True)
    write_config(directory, config, block)
    release = release_tensors(tensors, block)
    names = list(release)
    bounds = np.linspace(0, len(names), num_shards + 1).astype(int)
    shards = ({n: release[n] for n in names[a:b]} for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    write_shards(directory, shards, num_shards)
