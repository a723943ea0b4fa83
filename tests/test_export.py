"""HF export is the exact inverse of loading: export -> caee_jax.load reproduces the logits."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from conftest import random_tokens

import caee_jax
from caee_jax.weights.hf_export import save_hf


@pytest.mark.parametrize("name", ["tiny", "tiny-no-qlora", "tiny-all-moe"])
def test_round_trip_is_exact_in_float32(name, tmp_path):
    model = caee_jax.init_random(name, seed=3)
    save_hf(model.module, str(tmp_path))
    tokens = random_tokens(model.config.vocab_size, (2, 9))
    np.testing.assert_array_equal(np.asarray(caee_jax.load(tmp_path)(tokens)), np.asarray(model(tokens)))


def test_bfloat16_export_loads_as_bfloat16_values(tmp_path):
    model = caee_jax.init_random("tiny", seed=4)
    save_hf(model.module, str(tmp_path), ml_dtypes.bfloat16)
    loaded = caee_jax.load(tmp_path, dtype="bfloat16")
    expected = np.asarray(model.module.moe_layers.ffn.gate_proj[...]).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(np.asarray(loaded.module.moe_layers.ffn.gate_proj[...]), expected)
