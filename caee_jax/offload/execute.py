"""The execute stage of an offloaded MoE layer: the `loop` backend, reading each active expert from the
device cache and fetching a miss from the store when the loop reaches it.

The layer records its use of the experts on the device (`Usage`), then calls the host (`CacheManager.announce`)
only when it has something to read: a kept miss, or with read-ahead a predicted expert of the next layer to
prefetch or a staged read of its own to drop. A step whose layers all hit makes no host callback.

The loop visits active experts in increasing id, as for resident experts, and computes with the same
weights, so outputs are bit-identical to the all-resident model whatever the cache size (one slot is
enough: an expert is used once per layer and step). Letters: N tokens, K top-k, E experts, D hidden.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from caee_jax.experts.loop import loop_over_experts
from caee_jax.offload.cache import DECAY, CacheManager, ExpertCache, cache_bits
from caee_jax.offload.host_call import host_call
from caee_jax.routing.backend import ExpertWeights
from caee_jax.routing.ops import expert_load


def residency(cache: ExpertCache, layer_index: jax.Array, manager: CacheManager) -> jax.Array:
    """[E] int32 tier of each expert of the layer for the cost model: 0 resident, else the store's tier."""
    return jnp.where(cache.slot_of[layer_index] >= 0, 0, manager.store.tier_index).astype(jnp.int32)


def run_offloaded(
    x: jax.Array,
    topk_ids: jax.Array,
    topk_weights: jax.Array,
    keep_mask: jax.Array,
    cache: ExpertCache,
    layer_index: jax.Array,
    manager: CacheManager,
    next_hint: jax.Array,
) -> tuple[jax.Array, ExpertCache]:
    """x [N, D], routing [N, K] -> (y [N, D], updated cache). Only kept pairs' experts are fetched: a pruned
    miss is never loaded. next_hint [E] bool: the next MoE layer's predicted experts, to prefetch."""
    num_experts = manager.num_experts
    with jax.named_scope("execute_offloaded"):
        kept = expert_load(topk_ids, keep_mask, num_experts).active
        routed = expert_load(topk_ids, jnp.ones_like(keep_mask), num_experts).active
        resident = cache.slot_of[layer_index] >= 0
        reads = jnp.any(kept & ~resident)
        if manager.reads_ahead:  # a prediction of the next layer to read, or a staged one of this layer to drop
            following = cache.slot_of[jnp.minimum(layer_index + 1, manager.num_layers - 1)] >= 0
            has_next = layer_index + 1 < manager.num_layers
            reads |= jnp.any(cache.usage.predicted[layer_index] & ~resident)
            reads |= has_next & jnp.any(next_hint & ~following)
        cache = _record(cache, layer_index, manager, kept, routed, next_hint)
        bound = min(manager.slots, keep_mask.size)  # a layer of N tokens runs at most N * K experts
        load = functools.partial(_load_misses, layer_index=layer_index, manager=manager, bound=bound)
        cache = jax.lax.cond(reads, functools.partial(load, kept=kept, next_hint=next_hint), lambda c: c, cache)
        y, cache = loop_over_experts(
            x, topk_ids, topk_weights, keep_mask, num_experts, _reader(layer_index, manager), cache
        )
    return y, cache


def _record(cache: ExpertCache, layer, manager: CacheManager, kept, routed, next_hint) -> ExpertCache:
    """`cache` with the layer-step counted in its `Usage`: the clock ticks, the kept experts' history (what the
    eviction policies rank by) and the hit, miss, pruned-miss and prediction counters, and `next_hint` stored
    as the next layer's prediction. kept, routed (before pruning), next_hint: [E] bool."""
    usage = cache.usage
    resident = cache.slot_of[layer] >= 0
    predicted = usage.predicted[layer]
    scored = jnp.any(predicted)  # a layer nothing predicted (the first) is not scored
    counted = (
        kept & resident,
        kept & ~resident,
        routed & ~kept & ~resident,
        kept & scored,
        kept & predicted,
    )
    clock = usage.clock + 1
    predictions = usage.predicted.at[layer].set(False)
    following = jnp.minimum(layer + 1, manager.num_layers - 1)
    predictions = predictions.at[following].set(
        jnp.where(layer + 1 < manager.num_layers, next_hint, predictions[following])
    )
    usage = usage._replace(
        last_use=usage.last_use.at[layer].set(jnp.where(kept, clock, usage.last_use[layer])),
        uses=usage.uses.at[layer].add(kept.astype(jnp.int32)),
        decayed=usage.decayed.at[layer].set(usage.decayed[layer] * DECAY + kept),
        predicted=predictions,
        clock=clock,
        counts=usage.counts + jnp.stack([jnp.sum(c, dtype=jnp.int32) for c in counted]),
    )
    return cache._replace(usage=usage)


def _load_misses(cache: ExpertCache, *, layer_index, manager: CacheManager, kept, next_hint, bound) -> ExpertCache:
    """`cache` after the layer's `CacheManager.announce`, with the misses it placed written into their slots.
    kept, next_hint: [E] bool; bound: static upper limit on misses loaded, min(S, N * K)."""
    store = manager.store
    d, f = store.config.hidden_size, store.config.moe_intermediate_size
    index = jax.ShapeDtypeStruct((bound,), jnp.int32)
    shapes = (index, index, index, *(jax.ShapeDtypeStruct((bound, *s), store.dtype) for s in ((d, f), (d, f), (f, d))))
    announce = functools.partial(manager.announce, bound=bound)
    usage = cache.usage
    history = (usage.last_use[layer_index], usage.uses[layer_index], usage.decayed[layer_index])
    slots, experts, evicted, *weights = host_call(announce, shapes, layer_index, kept, next_hint, *history)
    bits = cache_bits(store.dtype)

    def write(i, cache: ExpertCache) -> ExpertCache:  # in place (a scatter copied the whole cache)
        start = (layer_index, slots[i], 0, 0)
        new = (jax.lax.bitcast_convert_type(w[i], bits)[None, None] for w in weights)
        return ExpertCache(
            *(jax.lax.dynamic_update_slice(w, n, start) for w, n in zip(cache[:3], new, strict=True)),
            cache.slot_of,
            cache.usage,
        )

    if bound:
        cache = jax.lax.fori_loop(0, jnp.sum(slots < manager.slots), write, cache)  # loaded misses come first
    slot_of = (
        cache.slot_of.at[layer_index, evicted].set(-1, mode="drop").at[layer_index, experts].set(slots, mode="drop")
    )
    return cache._replace(slot_of=slot_of)


def _reader(layer_index, manager: CacheManager):
    """read_expert(expert, cache) for `loop_over_experts`: the slot's weights, after a fetch on a miss."""
    store = manager.store
    d, f = store.config.hidden_size, store.config.moe_intermediate_size
    shapes = (
        jax.ShapeDtypeStruct((), jnp.int32),
        jax.ShapeDtypeStruct((), jnp.int32),
        *(jax.ShapeDtypeStruct(s, store.dtype) for s in ((d, f), (d, f), (f, d))),
    )

    def fetch(cache: ExpertCache, expert) -> ExpertCache:
        slot, evicted, gate, up, down = host_call(manager.fetch, shapes, layer_index, expert)
        slot_of = cache.slot_of.at[layer_index, evicted].set(-1, mode="drop").at[layer_index, expert].set(slot)
        # The weights' bits go into the integer cache (`ExpertCache`); read back per expert, in the loop.
        start, bits = (layer_index, slot, 0, 0), cache_bits(store.dtype)
        gate, up, down = (jax.lax.bitcast_convert_type(w, bits) for w in (gate, up, down))
        written = (
            jax.lax.dynamic_update_slice(w, new[None, None], start)
            for w, new in zip(cache[:3], (gate, up, down), strict=True)
        )
        return ExpertCache(*written, slot_of, cache.usage)

    def read_expert(expert, cache: ExpertCache):
        cache = jax.lax.cond(cache.slot_of[layer_index, expert] < 0, fetch, lambda c, _: c, cache, expert)
        slot = cache.slot_of[layer_index, expert]
        weights = (jax.lax.bitcast_convert_type(w[layer_index, slot], store.dtype) for w in cache[:3])
        return ExpertWeights(*weights), cache

    return read_expert
