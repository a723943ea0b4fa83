"""Model configuration for the DeepSeek-V3 architecture.

`ModelConfig` mirrors the field names of HF's DeepseekV3 `config.json`, is frozen (hashable, safe as a
static jit argument) and validated on construction: a bad value raises `ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Mapping
from typing import Any

from caee_jax import html


class ConfigError(ValueError):
    """An invalid or unsupported configuration value; the message names the field."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class YarnScaling:
    """YaRN rope scaling, as in `rope_scaling` (released configs) or `rope_parameters` (transformers 5)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None  # unset (as in transformers): cos/sin scaled by yarn_mscale(factor)
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self):
        if self.factor <= 0:
            raise ConfigError(f"rope_scaling.factor must be > 0, got {self.factor}")
        if self.original_max_position_embeddings <= 0:
            raise ConfigError(
                "rope_scaling.original_max_position_embeddings must be > 0, got "
                f"{self.original_max_position_embeddings}"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """DeepSeek-V3/R1 architecture hyper-parameters (HF `config.json` names)."""

    def _repr_html_(self) -> str:
        return html.fields_table(self, columns=3)

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    n_shared_experts: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 0
    kv_lora_rank: int
    q_lora_rank: int | None
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: YarnScaling | None = None
    rope_interleave: bool = True
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | tuple[int, ...] | None = 1
    num_nextn_predict_layers: int = 0
    hidden_act: str = "silu"
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    attention_bias: bool = False

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        self._validate()

    def _validate(self):
        positive = (
            "vocab_size hidden_size intermediate_size moe_intermediate_size num_hidden_layers "
            "num_attention_heads n_routed_experts num_experts_per_tok n_group topk_group kv_lora_rank "
            "qk_nope_head_dim qk_rope_head_dim v_head_dim max_position_embeddings"
        ).split()
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            raise ConfigError(f"q_lora_rank must be a positive integer or null, got {self.q_lora_rank!r}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if self.num_key_value_heads != self.num_attention_heads:
            raise ConfigError(
                f"num_key_value_heads ({self.num_key_value_heads}) must equal num_attention_heads "
                f"({self.num_attention_heads}): MLA has one latent shared by all heads"
            )
        if self.n_routed_experts % self.n_group:
            raise ConfigError(
                f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_group ({self.n_group})"
            )
        if self.topk_group > self.n_group:
            raise ConfigError(f"topk_group ({self.topk_group}) must be <= n_group ({self.n_group})")
        if self.n_group > 1 and self.experts_per_group < 2:
            raise ConfigError(
                f"n_routed_experts / n_group = {self.experts_per_group}: group scores sum each group's "
                "top-2 experts, so every group needs at least 2 experts"
            )
        if self.num_experts_per_tok > self.topk_group * self.experts_per_group:
            raise ConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts the selected groups "
                f"hold (topk_group {self.topk_group} x {self.experts_per_group} experts per group)"
            )
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ConfigError(
                f"first_k_dense_replace ({self.first_k_dense_replace}) must be <= num_hidden_layers "
                f"({self.num_hidden_layers})"
            )
        if self.routed_scaling_factor <= 0:
            raise ConfigError(f"routed_scaling_factor must be > 0, got {self.routed_scaling_factor}")
        if self.rms_norm_eps <= 0:
            raise ConfigError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if self.rope_theta <= 0:
            raise ConfigError(f"rope_theta must be > 0, got {self.rope_theta}")
        unsupported = {
            "hidden_act": (self.hidden_act, "silu"),
            "scoring_func": (self.scoring_func, "sigmoid"),
            "topk_method": (self.topk_method, "noaux_tc"),
            "attention_bias": (self.attention_bias, False),
        }
        for name, (value, supported) in unsupported.items():
            if value != supported:
                raise ConfigError(f"{name}={value!r} is not the DeepSeek-V3 architecture (expected {supported!r})")

    # Derived sizes -------------------------------------------------------------------------------
    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // self.n_group

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Values cached per token per layer: the compressed KV latent plus the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """`eos_token_id` as a tuple (empty when unset)."""
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    @property
    def num_dense_layers(self) -> int:
        return self.first_k_dense_replace

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim**-0.5, times YaRN's mscale(factor, mscale_all_dim)**2 when YaRN is on."""
        scale = self.qk_head_dim**-0.5
        if self.rope_scaling is not None and self.rope_scaling.mscale_all_dim:
            m = yarn_mscale(self.rope_scaling.factor, self.rope_scaling.mscale_all_dim)
            scale *= m * m
        return scale

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # HF config.json ------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, source: str | os.PathLike | Mapping[str, Any]) -> ModelConfig:
        """Reads a DeepseekV3 `config.json` (a directory, the file, or its parsed dict).

        Both rope spellings load: `rope_theta` + `rope_scaling` (released checkpoints) and
        `rope_parameters` (transformers 5 `save_pretrained`). Unknown keys are ignored.
        """
        where = "config dict"
        if isinstance(source, Mapping):
            raw = dict(source)
        else:
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            where = path
            try:
                with open(path) as f:
                    raw = json.load(f)
            except FileNotFoundError:
                raise ConfigError(f"{path}: no such config file") from None
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from None
            if not isinstance(raw, dict):
                raise ConfigError(f"{path}: a JSON {type(raw).__name__}, not an object of config fields")
        try:
            return cls._from_hf_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    @classmethod
    def _from_hf_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        model_type = raw.get("model_type", "deepseek_v3")
        if model_type != "deepseek_v3":
            raise ConfigError(f"model_type={model_type!r} is not 'deepseek_v3'")
        names = {f.name for f in dataclasses.fields(cls)} - {"rope_scaling", "rope_theta"}
        kwargs = {k: raw[k] for k in names if k in raw}
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [k for k in required if k not in kwargs]
        if missing:
            raise ConfigError(f"missing field(s): {', '.join(missing)}")
        theta, scaling = _read_rope(raw)
        kwargs["rope_theta"] = float(theta)
        kwargs["rope_scaling"] = scaling
        for name in ("routed_scaling_factor", "rms_norm_eps"):
            if name in kwargs:
                kwargs[name] = float(kwargs[name])
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        """The `config.json` dict for this config (released-checkpoint rope spelling)."""
        out = dataclasses.asdict(self)
        out["eos_token_id"] = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        if self.rope_scaling is not None:
            yarn = {k: v for k, v in dataclasses.asdict(self.rope_scaling).items() if v is not None}
            out["rope_scaling"] = {"type": "yarn", **yarn}
        out.update(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"])
        return out


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention magnitude correction 0.1 * mscale * ln(scale) + 1 (1 when not extending)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _read_rope(raw: dict[str, Any]) -> tuple[float, YarnScaling | None]:
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "yarn":
        raise ConfigError(f"rope type {rope_type!r} is not supported (only 'default' and 'yarn')")
    original = params.get("original_max_position_embeddings", raw.get("max_position_embeddings"))
    factor = params.get("factor")
    if factor is None:
        factor = raw["max_position_embeddings"] / original
    fields = {f.name for f in dataclasses.fields(YarnScaling)}
    extra = {k: params[k] for k in fields if k in params and params[k] is not None}
    extra.update(factor=float(factor), original_max_position_embeddings=int(original))
    for name in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
        if name in extra:
            extra[name] = float(extra[name])
    return theta, YarnScaling(**extra)


def _deepseek_671b() -> ModelConfig:
    """The published DeepSeek-V3 / DeepSeek-R1 671B architecture (both share it)."""
    return ModelConfig(
        vocab_size=129280,
        hidden_size=7168,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        num_hidden_layers=61,
        num_attention_heads=128,
        num_key_value_heads=128,
        n_shared_experts=1,
        n_routed_experts=256,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        first_k_dense_replace=3,
        kv_lora_rank=512,
        q_lora_rank=1536,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        max_position_embeddings=163840,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        rope_scaling=YarnScaling(
            factor=40.0,
            original_max_position_embeddings=4096,
            beta_fast=32.0,
            beta_slow=1.0,
            mscale=1.0,
            mscale_all_dim=1.0,
        ),
        bos_token_id=0,
        eos_token_id=1,
        num_nextn_predict_layers=1,
    )


def _tiny(**overrides) -> ModelConfig:
    """A few-layer model for tests: every architectural feature on, every size small (odd where it can)."""
    base = dict(
        vocab_size=211,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=24,
        num_hidden_layers=3,
        num_attention_heads=4,
        n_shared_experts=1,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,
        kv_lora_rank=32,
        q_lora_rank=48,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=12,
        max_position_embeddings=512,
        rope_scaling=YarnScaling(factor=4.0, original_max_position_embeddings=128, mscale=1.0, mscale_all_dim=1.0),
    )
    base.update(overrides)
    return ModelConfig(**base)


def _demo() -> ModelConfig:
    """A small model where MoE dominates (hidden 256, 64 experts, top-6): the random-weight demo."""
    return _tiny(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=768,
        moe_intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        n_routed_experts=64,
        num_experts_per_tok=6,
        n_group=8,
        topk_group=4,
        kv_lora_rank=64,
        q_lora_rank=96,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        max_position_embeddings=2048,
    )


PRESETS = {
    "deepseek-r1-671b": _deepseek_671b,
    "deepseek-v3-671b": _deepseek_671b,
    "demo": _demo,
    "tiny": _tiny,
    "tiny-no-qlora": functools.partial(_tiny, q_lora_rank=None, rope_scaling=None),
    "tiny-all-moe": functools.partial(_tiny, first_k_dense_replace=0, n_group=1, topk_group=1, norm_topk_prob=False),
}


def preset(name: str) -> ModelConfig:
    """A named configuration: one of `PRESETS`."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
