"""Loading an HF-format DeepseekV3 directory (config.json + safetensors) into a `DeepseekV3` module."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from caee_jax.config import ModelConfig
from caee_jax.model.transformer import DeepseekV3
from caee_jax.weights.hf_layout import hf_shape, is_ignored, recipes
from caee_jax.weights.safetensors_io import CheckpointError, CheckpointReader


def abstract_model(config: ModelConfig, dtype) -> DeepseekV3:
    """The model with ShapeDtypeStructs in place of arrays: nothing is allocated."""
    return nnx.eval_shape(lambda: DeepseekV3(config, dtype=dtype, rngs=nnx.Rngs(0)))


def load_hf_model(directory: str, config: ModelConfig, dtype=jnp.float32) -> DeepseekV3:
    """Builds the model from the directory's safetensors; every non-empty HF tensor must be used (MTP
    layers and rotary buffers aside), and every parameter must match its expected shape."""
    reader = CheckpointReader(directory)
    model = abstract_model(config, dtype)
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    used: set[str] = set()

    def get(name: str) -> np.ndarray:
        used.add(name)
        expected = hf_shape(name, config)
        if reader.shape(name) != expected:
            raise CheckpointError(
                f"{reader.file_of(name)}: tensor {name!r} has shape {reader.shape(name)}, expected {expected}"
            )
        return np.asarray(reader.read(name), dtype=np.float32)

    for recipe in recipes(config):
        missing = [n for n in recipe.sources if n not in reader]
        if missing:
            raise CheckpointError(f"{directory}: missing tensor {missing[0]!r} (needed for {'.'.join(recipe.target)})")
        variable = flat[recipe.target]
        value = recipe.build(get)
        assert value.shape == variable.shape, (recipe.target, value.shape, variable.shape)
        variable.set_value(jnp.asarray(value, dtype=variable.dtype))
    # Zero-element tensors carry nothing (transformers writes an empty shared MLP when n_shared_experts=0).
    unexpected = [n for n in reader if n not in used and not is_ignored(n, config) and np.prod(reader.shape(n)) > 0]
    if unexpected:
        raise CheckpointError(f"{reader.file_of(unexpected[0])}: unexpected tensor {unexpected[0]!r}")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def num_params(model: DeepseekV3) -> int:
    """Total parameter count (router bias included)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model)))
