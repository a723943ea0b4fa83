"""Writing a model as an HF-format DeepseekV3 directory: the inverse of `hf_layout.recipes`.

A round-trip test (export -> `caee_jax.load` -> identical logits) keeps the two in step.
"""

from __future__ import annotations

import json
import os

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from caee_jax.config import ModelConfig


def _layer_tensors(config: ModelConfig, prefix: str, moe: bool, get) -> dict[str, np.ndarray]:
    """HF tensors of one decoder layer; get(path) returns that layer's parameter as numpy."""
    h, c = config.num_attention_heads, config.v_head_dim
    a, m = prefix + "self_attn.", prefix + "mlp."
    out = {
        prefix + "input_layernorm.weight": get("attn_norm", "weight"),
        prefix + "post_attention_layernorm.weight": get("ffn_norm", "weight"),
        a + "kv_a_proj_with_mqa.weight": get("attn", "wkv_a").T,
        a + "kv_a_layernorm.weight": get("attn", "kv_norm", "weight"),
        a + "o_proj.weight": get("attn", "wo").reshape(h * c, -1).T,
    }
    kv_b = np.concatenate([get("attn", "wk_b"), get("attn", "wv_b")], axis=-1)  # [R, H, N+C]
    out[a + "kv_b_proj.weight"] = np.transpose(kv_b, (1, 2, 0)).reshape(-1, config.kv_lora_rank)
    if config.q_lora_rank is None:
        out[a + "q_proj.weight"] = get("attn", "wq").reshape(config.hidden_size, -1).T
    else:
        out[a + "q_a_proj.weight"] = get("attn", "wq_a").T
        out[a + "q_a_layernorm.weight"] = get("attn", "q_norm", "weight")
        out[a + "q_b_proj.weight"] = get("attn", "wq_b").reshape(config.q_lora_rank, -1).T
    projections = ("gate_proj", "up_proj", "down_proj")
    if not moe:
        out.update({f"{m}{p}.weight": get("ffn", p).T for p in projections})
        return out
    out[m + "gate.weight"] = get("ffn", "router").T
    out[m + "gate.e_score_correction_bias"] = get("ffn", "router_bias")
    if config.n_shared_experts:
        out.update({f"{m}shared_experts.{p}.weight": get("ffn", "shared", p).T for p in projections})
    for p in projections:
        stacked = get("ffn", p)  # [E, in, out]
        out.update({f"{m}experts.{e}.{p}.weight": stacked[e].T for e in range(config.n_routed_experts)})
    return out


class _LayerGetter:
    """get(*path) -> layer `index` of a stacked parameter, as a contiguous numpy array."""

    def __init__(self, flat: dict, stack: str, index: int):
        self.flat, self.stack, self.index = flat, stack, index

    def __call__(self, *path: str) -> np.ndarray:
        return np.ascontiguousarray(self.flat[(self.stack, *path)][self.index])


def hf_tensors(module, dtype=np.float32) -> dict[str, np.ndarray]:
    """Every HF DeepseekV3 tensor of a `DeepseekV3` module, cast to `dtype` (the bias stays float32)."""
    config: ModelConfig = module.config
    flat = {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(module))}
    out = {
        "model.embed_tokens.weight": flat[("embed", "embedding")],
        "model.norm.weight": flat[("final_norm", "weight")],
    }
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = flat[("lm_head",)].T
    stacks = (
        ("dense_layers", range(0, config.first_k_dense_replace), False),
        ("moe_layers", range(config.first_k_dense_replace, config.num_hidden_layers), True),
    )
    for stack, layer_ids, moe in stacks:
        for index, layer in enumerate(layer_ids):
            get = _LayerGetter(flat, stack, index)
            out.update(_layer_tensors(config, f"model.layers.{layer}.", moe, get))
    return {
        name: np.ascontiguousarray(t.astype(np.float32 if name.endswith("correction_bias") else dtype))
        for name, t in out.items()
    }


def save_hf(module, directory: str, dtype=np.float32) -> None:
    """Writes config.json and model.safetensors into `directory` (which must exist)."""
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(module.config.to_hf(), f, indent=2)
    save_file(hf_tensors(module, dtype), os.path.join(directory, "model.safetensors"))
