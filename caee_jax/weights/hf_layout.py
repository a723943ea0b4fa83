"""How each model parameter is built from HF DeepseekV3 tensors and back (the one place that knows HF names).

HF stores linear weights [out, in], one tensor per expert and per layer; the model stores [in, out],
experts stacked [E, ...] and layers stacked [L, ...]. A `Recipe` names the HF tensors a parameter needs,
how to assemble them and how to split the parameter back into them; loading, conversion, verification and
export (`hf_export`) all reuse the recipes.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable

import numpy as np

from caee_jax.config import ModelConfig

Getter = Callable[..., np.ndarray]  # get(name) -> the HF tensor; get(name, transpose=True) -> its 2-D transpose
Exporter = Callable[[np.ndarray, dict[str, np.ndarray]], None]  # export(value, hf): writes value's HF tensors


@dataclasses.dataclass(frozen=True)
class Recipe:
    """target: the parameter's path in the model state; sources: HF tensor names it reads;
    build(get): the parameter as a numpy array, reading tensors through `get`;
    export(value, hf): the inverse, writing the HF tensors of the parameter `value` into the dict `hf`
    (kv_b_proj is shared by two recipes, each filling its part)."""

    target: tuple[str, ...]
    sources: tuple[str, ...]
    build: Callable[[Getter], np.ndarray]
    export: Exporter


def _linear(path: tuple[str, ...], name: str, *shape: int, in_axes: int = 1) -> Recipe:
    """HF [out, in] -> [in, out], then reshaped to `shape` (e.g. splitting heads) when given; the first
    `in_axes` axes of `shape` hold HF's `in` dimension."""

    def build(get: Getter) -> np.ndarray:
        w = get(name, transpose=True)
        return w.reshape(shape) if shape else w

    def export(value: np.ndarray, hf: dict[str, np.ndarray]) -> None:
        hf[name] = value.reshape(math.prod(value.shape[:in_axes]), -1).T  # [in..., out...] -> [out, in]

    return Recipe(path, (name,), build, export)


def _copy(path: tuple[str, ...], name: str) -> Recipe:
    def export(value: np.ndarray, hf: dict[str, np.ndarray]) -> None:
        hf[name] = value

    return Recipe(path, (name,), lambda get: get(name), export)


def _kv_b(path: tuple[str, ...], name: str, config: ModelConfig, part: str) -> Recipe:
    """kv_b_proj [H*(N+C), R] -> key part [R, H, N] or value part [R, H, C]."""
    h, n, c, r = config.num_attention_heads, config.qk_nope_head_dim, config.v_head_dim, config.kv_lora_rank
    columns = slice(None, n) if part == "key" else slice(n, None)

    def build(get: Getter) -> np.ndarray:
        w = get(name).reshape(h, n + c, r)[:, columns]
        return np.transpose(w, (2, 0, 1))

    def export(value: np.ndarray, hf: dict[str, np.ndarray]) -> None:
        w = hf.setdefault(name, np.empty((h * (n + c), r), value.dtype))
        w.reshape(h, n + c, r)[:, columns] = np.transpose(value, (1, 2, 0))  # a view: fills this part of w

    return Recipe(path, (name,), build, export)


def _experts(path: tuple[str, ...], names: tuple[str, ...]) -> Recipe:
    """Per-expert HF [out, in] tensors -> one stacked [E, in, out], filled expert by expert (no list of copies)."""

    def build(get: Getter) -> np.ndarray:
        first = get(names[0], transpose=True)
        out = np.empty((len(names), *first.shape), first.dtype)
        out[0] = first
        for e, name in enumerate(names[1:], start=1):
            out[e] = get(name, transpose=True)
        return out

    def export(value: np.ndarray, hf: dict[str, np.ndarray]) -> None:
        hf.update((name, value[e].T) for e, name in enumerate(names))

    return Recipe(path, names, build, export)


def fp8_expert_scale_recipes(config: ModelConfig, layer: int) -> list[Recipe]:
    """The block scales of HF MoE layer `layer`'s routed experts as Recipes for the targets
    ffn.{gate,up,down}_scale [E, in/bm, out/bn] (FP8-stored experts, `routing/storage.py`): each expert's
    `weight_scale_inv` transposed like its weight. Sources are the weights (whose scales the source check
    requires); the build reads `name + "_scale_inv"`."""
    m = f"model.layers.{layer}.mlp."
    out = []
    for proj in ("gate_proj", "up_proj", "down_proj"):
        names = tuple(f"{m}experts.{e}.{proj}.weight" for e in range(config.n_routed_experts))

        def build(get: Getter, names=names) -> np.ndarray:
            return np.stack([get(name + "_scale_inv", transpose=True) for name in names])

        def export(value: np.ndarray, hf: dict[str, np.ndarray], names=names) -> None:
            hf.update((name + "_scale_inv", value[e].T) for e, name in enumerate(names))

        out.append(Recipe(("ffn", proj.replace("_proj", "_scale")), names, build, export))
    return out


def layer_recipes(config: ModelConfig, layer: int) -> list[Recipe]:
    """HF decoder layer `layer` (`model.layers.{layer}.`) as Recipes whose targets are paths inside one
    DecoderLayer (no layer axis); MoE from first_k_dense_replace on."""
    h, d = config.num_attention_heads, config.hidden_size
    qk, c = config.qk_head_dim, config.v_head_dim
    prefix = f"model.layers.{layer}."
    a, m = prefix + "self_attn.", prefix + "mlp."
    out = [
        _copy(("attn_norm", "weight"), prefix + "input_layernorm.weight"),
        _copy(("ffn_norm", "weight"), prefix + "post_attention_layernorm.weight"),
        _linear(("attn", "wkv_a"), a + "kv_a_proj_with_mqa.weight"),
        _copy(("attn", "kv_norm", "weight"), a + "kv_a_layernorm.weight"),
        _kv_b(("attn", "wk_b"), a + "kv_b_proj.weight", config, "key"),
        _kv_b(("attn", "wv_b"), a + "kv_b_proj.weight", config, "value"),
        _linear(("attn", "wo"), a + "o_proj.weight", h, c, d, in_axes=2),
    ]
    if config.q_lora_rank is None:
        out.append(_linear(("attn", "wq"), a + "q_proj.weight", d, h, qk))
    else:
        out += [
            _linear(("attn", "wq_a"), a + "q_a_proj.weight"),
            _copy(("attn", "q_norm", "weight"), a + "q_a_layernorm.weight"),
            _linear(("attn", "wq_b"), a + "q_b_proj.weight", config.q_lora_rank, h, qk),
        ]
    projections = ("gate_proj", "up_proj", "down_proj")
    if layer < config.first_k_dense_replace:
        return out + [_linear(("ffn", proj), f"{m}{proj}.weight") for proj in projections]
    out += [
        _linear(("ffn", "router"), m + "gate.weight"),
        _copy(("ffn", "router_bias"), m + "gate.e_score_correction_bias"),
    ]
    if config.n_shared_experts:
        out += [_linear(("ffn", "shared", proj), f"{m}shared_experts.{proj}.weight") for proj in projections]
    for proj in projections:
        names = tuple(f"{m}experts.{e}.{proj}.weight" for e in range(config.n_routed_experts))
        out.append(_experts(("ffn", proj), names))
    return out


def top_recipes(config: ModelConfig) -> list[Recipe]:
    """The parameters outside the decoder layers: embedding, final norm, LM head (when untied)."""
    top = [
        _copy(("embed", "embedding"), "model.embed_tokens.weight"),
        _copy(("final_norm", "weight"), "model.norm.weight"),
    ]
    if not config.tie_word_embeddings:
        top.append(_linear(("lm_head",), "lm_head.weight"))
    return top


def mtp_recipes(config: ModelConfig, k: int) -> list[Recipe]:
    """Multi-token-prediction module k, stored as HF layer num_hidden_layers + k; targets are paths inside
    `MTPLayer`. Its embedding and head are the release's own copies of the main model's."""
    layer = config.num_hidden_layers + k
    p = f"model.layers.{layer}."
    own = [
        _copy(("embed", "embedding"), p + "embed_tokens.weight"),
        _copy(("enorm", "weight"), p + "enorm.weight"),
        _copy(("hnorm", "weight"), p + "hnorm.weight"),
        _linear(("eh_proj",), p + "eh_proj.weight"),
        _copy(("head_norm", "weight"), p + "shared_head.norm.weight"),
        _linear(("head",), p + "shared_head.head.weight"),
    ]
    return own + [dataclasses.replace(r, target=("layer", *r.target)) for r in layer_recipes(config, layer)]


def stacks(config: ModelConfig) -> tuple[tuple[str, range], ...]:
    """(stack name in the model state, HF layer indices it holds): dense layers first, then MoE layers."""
    return (
        ("dense_layers", range(0, config.first_k_dense_replace)),
        ("moe_layers", range(config.first_k_dense_replace, config.num_hidden_layers)),
    )


def recipes(config: ModelConfig) -> list[Recipe]:
    """Every parameter of `DeepseekV3(config)` as a Recipe over HF tensor names (layers stacked)."""
    result = top_recipes(config)
    for stack, layer_ids in stacks(config):
        per_layer = [layer_recipes(config, i) for i in layer_ids]
        result += [_stack_layers(stack, layers) for layers in zip(*per_layer, strict=True)]
    return result


def fp8_scale_recipes(config: ModelConfig) -> list[Recipe]:
    """The routed experts' block scales of every MoE layer, stacked [L, E, ...] (`fp8_expert_scale_recipes`)."""
    per_layer = [fp8_expert_scale_recipes(config, i) for i in dict(stacks(config))["moe_layers"]]
    return [_stack_layers("moe_layers", layers) for layers in zip(*per_layer, strict=True)]


def _stack_layers(stack: str, layers: tuple[Recipe, ...]) -> Recipe:
    """One parameter's recipes for consecutive layers -> its recipe in `stack`, value [L, ...]."""

    def build(get: Getter) -> np.ndarray:
        return np.stack([recipe.build(get) for recipe in layers])

    def export(value: np.ndarray, hf: dict[str, np.ndarray]) -> None:
        for layer_value, recipe in zip(value, layers, strict=True):
            recipe.export(layer_value, hf)

    sources = tuple(name for recipe in layers for name in recipe.sources)
    return Recipe((stack, *layers[0].target), sources, build, export)


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_FP8_LINEAR = re.compile(
    r"^model\.layers\.\d+\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.((shared_experts|experts\.\d+)\.)?(gate_proj|up_proj|down_proj))\.weight$"
)


def mtp_module(name: str, config: ModelConfig) -> int | None:
    """k when `name` belongs to MTP module k (HF layer num_hidden_layers + k), else None."""
    match = _LAYER.match(name)
    if match is None or int(match.group(1)) < config.num_hidden_layers:
        return None
    return int(match.group(1)) - config.num_hidden_layers


def is_buffer(name: str) -> bool:
    """Non-parameter tensors some exports carry (rotary inverse frequencies)."""
    return name.endswith("rotary_emb.inv_freq")


def is_ignored(name: str, config: ModelConfig) -> bool:
    """Tensors `caee_jax.load` skips: the MTP modules and rotary buffers."""
    return is_buffer(name) or mtp_module(name, config) is not None


def may_be_fp8(name: str) -> bool:
    """DeepSeek's release stores exactly these as block-scaled FP8: the linear weights inside decoder layers
    (attention projections, dense MLP, routed and shared experts), the MTP module's layer included; never
    embeddings, heads, norms, the router `mlp.gate.weight`, its bias or the MTP `eh_proj`."""
    return _FP8_LINEAR.match(name) is not None


def hf_shape(name: str, config: ModelConfig) -> tuple[int, ...]:
    """The shape an HF DeepseekV3 tensor must have under `config` (KeyError for an unknown name)."""
    d, h, v = config.hidden_size, config.num_attention_heads, config.vocab_size
    r, p, c = config.kv_lora_rank, config.qk_rope_head_dim, config.v_head_dim
    f, shared = config.moe_intermediate_size, config.moe_intermediate_size * config.n_shared_experts
    q, e, i = config.q_lora_rank, config.n_routed_experts, config.intermediate_size
    top = {
        "model.embed_tokens.weight": (v, d),
        "model.norm.weight": (d,),
        "lm_head.weight": (v, d),
    }
    if name in top:
        return top[name]
    suffix = re.sub(r"^model\.layers\.\d+\.", "", name)
    suffix = re.sub(r"^mlp\.experts\.\d+\.", "expert.", suffix)
    shapes = {
        "input_layernorm.weight": (d,),
        "post_attention_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (h * config.qk_head_dim, d),
        "self_attn.q_a_proj.weight": (q, d),
        "self_attn.q_a_layernorm.weight": (q,),
        "self_attn.q_b_proj.weight": (h * config.qk_head_dim, q),
        "self_attn.kv_a_proj_with_mqa.weight": (r + p, d),
        "self_attn.kv_a_layernorm.weight": (r,),
        "self_attn.kv_b_proj.weight": (h * (config.qk_nope_head_dim + c), r),
        "self_attn.o_proj.weight": (d, h * c),
        "mlp.gate_proj.weight": (i, d),
        "mlp.up_proj.weight": (i, d),
        "mlp.down_proj.weight": (d, i),
        "mlp.gate.weight": (e, d),
        "mlp.gate.e_score_correction_bias": (e,),
        "mlp.shared_experts.gate_proj.weight": (shared, d),
        "mlp.shared_experts.up_proj.weight": (shared, d),
        "mlp.shared_experts.down_proj.weight": (d, shared),
        "expert.gate_proj.weight": (f, d),
        "expert.up_proj.weight": (f, d),
        "expert.down_proj.weight": (d, f),
        "embed_tokens.weight": (v, d),
        "enorm.weight": (d,),
        "hnorm.weight": (d,),
        "eh_proj.weight": (d, 2 * d),
        "shared_head.norm.weight": (d,),
        "shared_head.head.weight": (v, d),
    }
    return shapes[suffix]
