"""The DeepSeek-V3 decoder: embedding, dense-MLP layers, MoE layers, final norm, LM head.

Layers of each kind are stacked (a leading layer axis on every parameter) and run with `lax.scan`, so
tracing and compile time do not grow with depth (the 671B preset traces abstractly in seconds).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from caee_jax.config import ModelConfig
from caee_jax.model.attention import MLAttention
from caee_jax.model.cache import LatentCache
from caee_jax.model.execution import DEFAULT_EXECUTION, Execution
from caee_jax.model.layers import MLP, Embed, RMSNorm, param
from caee_jax.model.moe import ExpertImportance, ExpertMeans, MoE, Routing
from caee_jax.offload.cache import ExpertCache
from caee_jax.parallel.eplb import Placement
from caee_jax.parallel.replicas import check_placement, slot_tables
from caee_jax.routing.storage import Storage


class DecoderLayer(nnx.Module):
    """Pre-norm block: h + MLA(norm(h)), then h + FFN(norm(h)) where FFN is a dense MLP or MoE."""

    def __init__(self, config: ModelConfig, dtype, *, moe: bool, rngs: nnx.Rngs, weights: Storage | None = None):
        d = config.hidden_size
        self.attn_norm = RMSNorm(d, config.rms_norm_eps, dtype, rngs=rngs)
        self.attn = MLAttention(config, dtype, rngs=rngs)
        self.ffn_norm = RMSNorm(d, config.rms_norm_eps, dtype, rngs=rngs)
        if moe:
            self.ffn = MoE(config, dtype, rngs=rngs, weights=weights)
        else:
            self.ffn = MLP(d, config.intermediate_size, dtype, rngs=rngs)

    def __call__(
        self,
        h,
        positions,
        cache,
        execution: Execution,
        layer_index=None,
        collect_expert_sums=False,
        expert_cache=None,
        next_router=None,
        valid=None,
    ):
        """h [B, T, D] -> (h, cache or new latents [B, T, R+P], routing or None, expert_cache); layer_index,
        collect_expert_sums, valid as in `MoE`; expert_cache, next_router: the device expert cache when the
        experts are offloaded, and the next MoE layer's router for prefetching (`MoE.offloaded`)."""
        attn_out, cache = self.attn(self.attn_norm(h), positions, cache)
        h = h + attn_out
        normed = self.ffn_norm(h)
        routing = None
        if isinstance(self.ffn, MoE) and expert_cache is not None:
            ffn_out, routing, expert_cache = self.ffn.offloaded(
                normed, execution, layer_index, expert_cache, next_router, valid
            )
        elif isinstance(self.ffn, MoE):
            ffn_out, routing = self.ffn(
                normed, execution, layer_index, collect_expert_sums=collect_expert_sums, valid=valid
            )
        else:
            ffn_out = self.ffn(normed)
        return h + ffn_out, cache, routing, expert_cache


def stacked_layers(
    config: ModelConfig, dtype, *, moe: bool, count: int, rngs: nnx.Rngs, weights: Storage | None = None
) -> DecoderLayer | None:
    """`count` DecoderLayers as one module whose parameters carry a leading "layers" axis (None if 0);
    weights: the routed experts' storage (`MoE`)."""
    if count == 0:
        return None

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(layer_rngs):
        return DecoderLayer(config, dtype, moe=moe, rngs=layer_rngs, weights=weights)

    layers = make(rngs)
    for _, variable in nnx.iter_graph(layers):
        if isinstance(variable, nnx.Variable) and variable.has_metadata("logical_axes"):
            variable.set_metadata(logical_axes=("layers", *variable.get_metadata()["logical_axes"]))
    return layers


class ModelOutput(NamedTuple):
    """logits [B, T, V] f32; cache: updated LatentCache (decode) or the new latents [L, B, T, R+P] (no cache);
    routing: Routing with a leading MoE-layer axis [L_moe, B, T, K]; expert_cache: the updated device
    expert cache of an offloaded model, else None."""

    logits: jax.Array
    cache: LatentCache
    routing: Routing | None
    expert_cache: ExpertCache | None = None


class DeepseekV3(nnx.Module):
    """The causal language model: parameters in `dtype` (the compute dtype), except the routed experts when
    `weights` names their storage (`routing/storage.py`: "f32", "bf16", "fp8")."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs, weights: Storage | None = None):
        self.config = config
        self.embed = Embed(config.vocab_size, config.hidden_size, dtype, rngs=rngs)
        self.dense_layers = nnx.data(stacked_layers(config, dtype, moe=False, count=config.num_dense_layers, rngs=rngs))
        moe_count = config.num_moe_layers
        self.moe_layers = nnx.data(stacked_layers(config, dtype, moe=True, count=moe_count, rngs=rngs, weights=weights))
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, rngs=rngs)
        head_shape = (config.hidden_size, config.vocab_size)
        tied = config.tie_word_embeddings
        self.lm_head = nnx.data(None if tied else param(rngs, head_shape, ("embed", "vocab"), dtype))

    @property
    def expert_storage(self) -> Storage | None:
        """How the routed experts are stored (None: a model without MoE layers)."""
        if self.moe_layers is None:
            return None
        ffn = self.moe_layers.ffn
        if ffn.gate_scale is not None:
            return Storage.FP8
        return Storage.BF16 if ffn.gate_proj.dtype == jnp.bfloat16 else Storage.F32

    def store_experts(self, weights: Storage | str) -> None:
        """Re-stores the routed experts of every MoE layer as `weights` (`MoE.store_experts`)."""
        if self.moe_layers is not None:
            self.moe_layers.ffn.store_experts(weights)

    def set_placement(self, placement: Placement | None, num_shards: int = 1) -> None:
        """Holds the routed experts as the physical slots of an EPLB placement (`parallel/replicas.py`),
        checked against this model and the `num_shards` expert shards it will run on; None: one slot per
        expert again. Weights are gathered once, here."""
        if self.moe_layers is None:
            raise ValueError("the model has no MoE layers: nothing to place")
        tables = None
        if placement is not None:
            check_placement(placement, self.config.num_moe_layers, self.config.n_routed_experts, num_shards)
            tables = slot_tables(placement)
        self.moe_layers.ffn.place_experts(tables)

    def set_expert_means(self, means) -> None:
        """Sets each MoE layer's calibrated mean expert outputs, [L_moe, E, D] (stored float32), for `mean`
        compensation (`caee/expert_means.py`). Replicated on a mesh: E x D per layer is small next to the
        layer's experts, and the lookup then needs no collective."""
        c = self.config
        expected = (c.num_moe_layers, c.n_routed_experts, c.hidden_size)
        if self.moe_layers is None:
            raise ValueError("the model has no MoE layers: nothing to set expert means on")
        if jnp.shape(means) != expected:
            raise ValueError(f"expert means of shape {jnp.shape(means)}; this model needs [L_moe, E, D] = {expected}")
        value = jnp.asarray(means, jnp.float32)
        self.moe_layers.ffn.expert_means = ExpertMeans(value, logical_axes=("layers", "router", "embed"))

    def set_importance(self, expert_scale, layer_sensitivity) -> None:
        """Sets CAEE's calibrated importance (`caee/importance.py`): a factor per MoE layer and expert
        [L_moe, E] and a sensitivity per MoE layer [L_moe] (stored float32, replicated on a mesh)."""
        c = self.config
        if self.moe_layers is None:
            raise ValueError("the model has no MoE layers: nothing to set importance on")
        for name, value, expected in (
            ("expert_scale", expert_scale, (c.num_moe_layers, c.n_routed_experts)),
            ("layer_sensitivity", layer_sensitivity, (c.num_moe_layers,)),
        ):
            if jnp.shape(value) != expected:
                raise ValueError(f"{name} of shape {jnp.shape(value)}; this model needs {expected}")
        ffn = self.moe_layers.ffn
        ffn.expert_importance = ExpertImportance(
            jnp.asarray(expert_scale, jnp.float32), logical_axes=("layers", "router")
        )
        ffn.layer_sensitivity = ExpertImportance(jnp.asarray(layer_sensitivity, jnp.float32), logical_axes=("layers",))

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        cache: LatentCache | None = None,
        execution: Execution = DEFAULT_EXECUTION,
        *,
        collect_expert_sums: bool = False,
        expert_cache: ExpertCache | None = None,
        valid: jax.Array | None = None,
    ) -> ModelOutput:
        """tokens int [B, T] at positions [B, T] (default 0..T-1).

        Without `cache`: causal pass over the T tokens. With `cache`: the tokens' latents are written at
        their positions and each attends to the cache up to its own position (decode / chunked prefill).
        execution: how the MoE layers run (static). collect_expert_sums: each MoE layer's routing carries
        its experts' output sums (`MoE`; calibration of `mean` compensation). expert_cache: with offloaded
        experts (`execution.offload`), the device expert cache, threaded through the MoE layers.
        valid: [B] bool, the real rows of a batch padded to split over the mesh (None: every row); a dummy
        row's pairs never run and count in no pruning decision (`MoE`).
        """
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        h = self.embed(tokens)
        dense_cache = None if cache is None else cache.dense
        moe_cache = None if cache is None else cache.moe
        latent_dim = self.config.latent_dim
        h, dense_cache, _, _ = _scan(self.dense_layers, h, positions, dense_cache, execution, latent_dim)
        h, moe_cache, routing, expert_cache = _scan(
            self.moe_layers, h, positions, moe_cache, execution, latent_dim, collect_expert_sums, expert_cache, valid
        )
        h = self.final_norm(h)
        head = self.embed.embedding[...].T if self.lm_head is None else self.lm_head[...]
        logits = jnp.einsum("btd,dv->btv", h, head, preferred_element_type=jnp.float32)
        return ModelOutput(logits, LatentCache(dense_cache, moe_cache), routing, expert_cache)


def _scan(
    layers: DecoderLayer | None,
    h,
    positions,
    cache,
    execution: Execution,
    latent_dim: int,
    collect_sums=False,
    expert_cache=None,
    valid=None,
):
    """Runs a layer stack over h; cache [L, B, S, C] or None; expert_cache carried (updated in place) when
    given; valid [B] bool or None (`DeepseekV3.__call__`). Returns (h, cache or latents, routing,
    expert_cache)."""
    if layers is None:
        empty = jnp.zeros((0, *h.shape[:2], latent_dim), h.dtype) if cache is None else cache
        return h, empty, None, expert_cache
    # Routed-expert stacks stay whole (closed over, indexed [layer, expert] by the backend): as scan
    # inputs, XLA would copy every expert of the layer each step, whichever experts are active.
    graphdef, experts, state = nnx.split(layers, _is_routed_expert, ...)

    def body(carry, xs):
        h, expert_cache = carry
        layer_state, layer_cache, index, next_router = xs
        layer = nnx.merge(graphdef, experts, layer_state)
        layer_index = index if experts else None
        h, layer_cache, routing, expert_cache = layer(
            h, positions, layer_cache, execution, layer_index, collect_sums, expert_cache, next_router, valid
        )
        return (h, expert_cache), (layer_cache, routing)

    count = jax.tree.leaves(state)[0].shape[0]
    next_routers = _next_routers(state, count) if expert_cache is not None else None
    xs = (state, cache, jnp.arange(count), next_routers)
    (h, expert_cache), (cache, routing) = jax.lax.scan(body, (h, expert_cache), xs)
    return h, cache, routing, expert_cache


def _next_routers(state: nnx.State, count: int):
    """Per MoE layer l, layer l+1's router weight [D, E] and bias [E] and whether there is a layer l+1: the
    prefetch of offloaded experts applies the next router early to this layer's input (pre-gating)."""
    flat = dict(nnx.to_flat_state(state))
    weight, bias = (flat[("ffn", name)].get_value() for name in ("router", "router_bias"))
    return jnp.roll(weight, -1, axis=0), jnp.roll(bias, -1, axis=0), jnp.arange(count) < count - 1


def _is_routed_expert(path, value) -> bool:
    """The MoE's stacked routed-expert weights (and fp8 block scales): ffn.{gate,up,down}_{proj,scale} of a
    layer whose ffn routes."""
    names = {f"{w}_{kind}" for w in ("gate", "up", "down") for kind in ("proj", "scale")}
    return len(path) == 2 and path[0] == "ffn" and path[1] in names and value.ndim == 4
