"""Loading an HF-format DeepseekV3 directory (config.json + safetensors) into a `DeepseekV3` module."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from caee_jax.config import ModelConfig
from caee_jax.model.transformer import DeepseekV3
from caee_jax.routing.storage import BLOCK, Storage
from caee_jax.weights.hf_layout import fp8_scale_recipes, is_ignored, recipes
from caee_jax.weights.hf_source import HFSource


def abstract_model(config: ModelConfig, dtype, weights=None) -> DeepseekV3:
    """The model with ShapeDtypeStructs in place of arrays: nothing is allocated. weights: the routed
    experts' storage (`routing/storage.py`), None: dtype."""
    return nnx.eval_shape(lambda: DeepseekV3(config, dtype=dtype, rngs=nnx.Rngs(0), weights=weights))


def load_hf_model(directory: str, config: ModelConfig, dtype=jnp.float32, weights=None) -> DeepseekV3:
    """Builds the model from the directory's safetensors (FP8 block-scaled weights dequantised). The whole
    inventory is checked first (`HFSource.check`; MTP layers and rotary buffers are skipped).

    weights: the routed experts' storage (`routing/storage.py`; None: dtype). "fp8" from a release whose
    routed experts are FP8 in 128x128 blocks keeps their bytes and scales unchanged (transposed to the
    model's [in, out]); from any other source the experts are block-quantised after loading.
    """
    source = HFSource(directory, config)
    weights = None if weights is None else Storage.parse(weights, "weights")
    all_recipes = recipes(config)
    source.check(all_recipes, skip=lambda name: is_ignored(name, config))
    experts = [("moe_layers", "ffn", proj) for proj in ("gate_proj", "up_proj", "down_proj")]
    keep = weights is Storage.FP8 and source.block == BLOCK
    keep = keep and all(source.is_fp8(n) for r in all_recipes if r.target in experts for n in r.sources)
    if keep:  # the experts' targets become float8 (read as stored) and their scales are read too
        all_recipes += fp8_scale_recipes(config)
    graphdef, state = nnx.split(abstract_model(config, dtype, Storage.FP8 if keep else None))
    flat = dict(nnx.to_flat_state(state))
    for recipe in all_recipes:
        variable = flat[recipe.target]
        value = recipe.build(lambda name, transpose=False, dtype=variable.dtype: source.read(name, dtype, transpose))
        assert value.shape == variable.shape, (recipe.target, value.shape, variable.shape)
        variable.set_value(jnp.asarray(value))
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    if weights is not None and not keep:
        model.store_experts(weights)
    return model


def num_params(model: DeepseekV3) -> int:
    """Total parameter count (router bias included)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model)))
