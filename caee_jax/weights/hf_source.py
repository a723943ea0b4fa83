"""An HF DeepseekV3 checkpoint directory checked against a model config and read tensor by tensor.

`check` validates the whole inventory from the safetensors headers alone (nothing is read): every tensor
the recipes need is present with its expected shape and a floating-point dtype, FP8 only where DeepSeek's
release uses it and always with its `weight_scale_inv` of the right shape, and no tensor is left over.
`read` returns one tensor in the requested dtype, FP8 ones dequantised (`fp8.py`). Loading and conversion
both go through this class, so they accept and reject exactly the same checkpoints.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable

import ml_dtypes
import numpy as np

from caee_jax.config import ModelConfig
from caee_jax.weights.fp8 import BLOCK, FP8_DTYPE, dequantize, scale_shape
from caee_jax.weights.hf_layout import Recipe, hf_shape, may_be_fp8
from caee_jax.weights.safetensors_io import INDEX_NAME, CheckpointError, CheckpointReader

SCALE_SUFFIX = "_scale_inv"
FLOAT_DTYPES = {np.dtype(t) for t in (np.float64, np.float32, np.float16, ml_dtypes.bfloat16)}


def fp8_block(directory: str) -> tuple[int, int]:
    """The FP8 block shape from config.json's `quantization_config` (DeepSeek: fp8, e4m3, [128, 128])."""
    path = os.path.join(directory, "config.json")
    try:
        with open(path) as f:
            raw = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable config ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: a JSON {type(raw).__name__}, not an object of config fields")
    quantization = raw.get("quantization_config")
    if quantization is None:
        return BLOCK
    if not isinstance(quantization, dict):
        raise CheckpointError(f"{path}: quantization_config {quantization!r} is not an object")
    method, fmt = quantization.get("quant_method", "fp8"), quantization.get("fmt", "e4m3")
    block = quantization.get("weight_block_size", list(BLOCK))
    if method != "fp8" or fmt != "e4m3":
        raise CheckpointError(f"{path}: quantization {method}/{fmt} is not supported (only DeepSeek's fp8/e4m3)")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointError(f"{path}: quantization_config.weight_block_size {block!r} is not two positive ints")
    return tuple(block)


class HFSource:
    """The tensors of `directory` for `config`: `check(recipes, skip)`, then `read(name, dtype)`."""

    def __init__(self, directory: str, config: ModelConfig):
        self.directory = directory
        self.config = config
        self.reader = CheckpointReader(directory)
        self.block = fp8_block(directory)
        index = os.path.join(directory, INDEX_NAME)
        self._where_missing = index if os.path.exists(index) else directory

    def is_fp8(self, name: str) -> bool:
        return self.reader.dtype(name) == FP8_DTYPE

    def check(self, recipes: Iterable[Recipe], skip: Callable[[str], bool]) -> None:
        """Raises CheckpointError naming the file and tensor of the first problem; `skip(name)` marks
        tensors that may be present and are not used (their FP8 scales are skipped with them)."""
        needed: dict[str, str] = {}
        for recipe in recipes:
            for name in recipe.sources:
                needed.setdefault(name, ".".join(recipe.target))
        for name, target in needed.items():
            if name not in self.reader:
                raise CheckpointError(f"{self._where_missing}: missing tensor {name!r} (needed for {target})")
        for name in needed:
            self._check_tensor(name)
        scales = {name + SCALE_SUFFIX for name in needed if self.is_fp8(name)}
        for name in self.reader:
            if name in needed or name in scales or np.prod(self.reader.shape(name)) == 0:
                continue  # transformers writes zero-element tensors for an absent shared MLP
            if skip(name.removesuffix(SCALE_SUFFIX)):
                continue
            raise CheckpointError(f"{self.reader.file_of(name)}: unexpected tensor {name!r}")

    def _check_tensor(self, name: str) -> None:
        file, shape, dtype = self.reader.file_of(name), self.reader.shape(name), self.reader.dtype(name)
        expected = hf_shape(name, self.config)
        if shape != expected:
            raise CheckpointError(f"{file}: tensor {name!r} has shape {shape}, expected {expected}")
        if dtype == FP8_DTYPE:
            if not may_be_fp8(name):
                raise CheckpointError(
                    f"{file}: tensor {name!r} has dtype float8_e4m3fn; DeepSeek's layout keeps it in a "
                    "16/32-bit float (only linear weights inside decoder layers are FP8)"
                )
            scale = name + SCALE_SUFFIX
            if scale not in self.reader:
                raise CheckpointError(f"{file}: FP8 tensor {name!r} has no scale {scale!r}")
            scale_file, expected = self.reader.file_of(scale), scale_shape(shape, self.block)
            if self.reader.shape(scale) != expected:
                raise CheckpointError(
                    f"{scale_file}: tensor {scale!r} has shape {self.reader.shape(scale)}, expected {expected} "
                    f"({self.block[0]}x{self.block[1]} blocks of {name!r} {shape})"
                )
            if self.reader.dtype(scale) not in FLOAT_DTYPES:
                raise CheckpointError(f"{scale_file}: tensor {scale!r} has dtype {self.reader.dtype(scale)}, not float")
        elif dtype not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{file}: tensor {name!r} has dtype {dtype}, expected float32, bfloat16, float16"
                + (" or float8_e4m3fn" if may_be_fp8(name) else "")
            )

    def read(self, name: str, dtype, transpose: bool = False) -> np.ndarray:
        """The tensor in `dtype`: FP8 dequantised with its scale (rounded once), others cast; with dtype
        float8_e4m3fn an FP8 tensor's bytes unchanged (its scale is read apart, `name + "_scale_inv"`).
        transpose: a 2-D tensor transposed ([out, in] -> [in, out]), contiguous."""
        value = self.reader.read(name)
        if np.dtype(dtype) == FP8_DTYPE:
            if value.dtype != FP8_DTYPE:
                raise CheckpointError(
                    f"{self.reader.file_of(name)}: {name!r} is {value.dtype}, not FP8; cannot keep FP8"
                )
            if self.block != BLOCK:
                raise CheckpointError(f"{self.directory}: FP8 blocks {self.block}; keeping FP8 needs {BLOCK}")
            return np.ascontiguousarray(value.T if transpose else value)
        if value.dtype == FP8_DTYPE:
            return dequantize(value, self.reader.read(name + SCALE_SUFFIX), dtype, self.block, transpose)
        return np.ascontiguousarray(value.T if transpose else value, dtype=dtype)

    def nbytes(self, name: str) -> int:
        """Bytes the tensor occupies in the checkpoint, its FP8 scale included."""
        scale = name + SCALE_SUFFIX
        return self.reader.nbytes(name) + (self.reader.nbytes(scale) if self.is_fp8(name) else 0)
