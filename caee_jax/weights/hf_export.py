"""Writing a model as an HF-format DeepseekV3 directory: each of `hf_layout.recipes` run backwards (`export`).

A round-trip test (export -> `caee_jax.load` -> identical logits) checks each export against its build.
"""

from __future__ import annotations

import json
import os

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from caee_jax.weights.hf_layout import recipes


def hf_tensors(module, dtype=np.float32) -> dict[str, np.ndarray]:
    """Every HF DeepseekV3 tensor of a `DeepseekV3` module, cast to `dtype` (the bias stays float32). A module
    holding EPLB replicas is refused: its expert stacks are physical slots (`set_placement(None)` first)."""
    if module.moe_layers is not None and module.moe_layers.ffn.expert_slots is not None:
        raise ValueError("the model holds EPLB replicas (physical expert slots); export it after set_placement(None)")
    flat = {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(module))}
    out: dict[str, np.ndarray] = {}
    for recipe in recipes(module.config):
        recipe.export(flat[recipe.target], out)
    return {
        name: np.ascontiguousarray(t.astype(np.float32 if name.endswith("correction_bias") else dtype))
        for name, t in out.items()
    }


def save_hf(module, directory: str, dtype=np.float32) -> None:
    """Writes config.json and model.safetensors into `directory` (which must exist)."""
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(module.config.to_hf(), f, indent=2)
    save_file(hf_tensors(module, dtype), os.path.join(directory, "model.safetensors"))
