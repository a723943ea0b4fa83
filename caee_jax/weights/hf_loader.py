"""Loading an HF-format DeepseekV3 directory (config.json + safetensors) into a `DeepseekV3` module."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from caee_jax.config import ModelConfig
from caee_jax.model.transformer import DeepseekV3
from caee_jax.weights.hf_layout import is_ignored, recipes
from caee_jax.weights.hf_source import HFSource


def abstract_model(config: ModelConfig, dtype, weights=None) -> DeepseekV3:
    """The model with ShapeDtypeStructs in place of arrays: nothing is allocated. weights: the routed
    experts' storage (`routing/storage.py`), None: dtype."""
    return nnx.eval_shape(lambda: DeepseekV3(config, dtype=dtype, rngs=nnx.Rngs(0), weights=weights))


def load_hf_model(directory: str, config: ModelConfig, dtype=jnp.float32) -> DeepseekV3:
    """Builds the model from the directory's safetensors (FP8 block-scaled weights dequantised). The whole
    inventory is checked first (`HFSource.check`; MTP layers and rotary buffers are skipped)."""
    source = HFSource(directory, config)
    model = abstract_model(config, dtype)
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    all_recipes = recipes(config)
    source.check(all_recipes, skip=lambda name: is_ignored(name, config))
    for recipe in all_recipes:
        variable = flat[recipe.target]
        value = recipe.build(lambda name, transpose=False, dtype=variable.dtype: source.read(name, dtype, transpose))
        assert value.shape == variable.shape, (recipe.target, value.shape, variable.shape)
        variable.set_value(jnp.asarray(value))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def num_params(model: DeepseekV3) -> int:
    """Total parameter count (router bias included)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model)))
