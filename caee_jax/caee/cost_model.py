"""Predicting expert-execution time from routing with a cost table (pure jnp, static table, jit-friendly).

Device d's time for one MoE layer:

    t_d = fixed_s + pair_s * computed rows on d + activation_s * active experts on d
          + sum over active non-resident experts on d of fetch_s[tier] + comm_token_s * tokens

and the layer takes max_d t_d (it ends when the slowest device ends). Computed rows are the kept
pairs, except that the `loop` backend computes each expert's pairs in whole tiles of `row_tile` rows
(`experts.loop.default_tile_rows`), so its counts are rounded up per expert. Letters: N tokens,
K top-k, E experts, S devices (expert shards).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from caee_jax.caee.cost_table import CostTable
from caee_jax.experts.loop import default_tile_rows


class Prediction(NamedTuple):
    """device_s [S]: predicted time per device (s); layer_s: their maximum."""

    device_s: jax.Array
    layer_s: jax.Array


class ExpertLoad(NamedTuple):
    """pairs [E] int32: kept pairs per expert; active [E] bool: experts with at least one kept pair."""

    pairs: jax.Array
    active: jax.Array


def expert_load(topk_ids: jax.Array, keep_mask: jax.Array, num_experts: int) -> ExpertLoad:
    """topk_ids, keep_mask [N, K] -> kept pairs and activity per expert."""
    pairs = jnp.bincount(jnp.where(keep_mask, topk_ids, num_experts).reshape(-1), length=num_experts + 1)
    pairs = pairs[:num_experts].astype(jnp.int32)
    return ExpertLoad(pairs, pairs > 0)


def row_tile(backend: str, num_tokens: int, top_k: int, local_experts: int) -> int:
    """Rows an expert's pairs are computed in on a device holding `local_experts`: the loop backend's
    tile for this batch, else 1."""
    return default_tile_rows(num_tokens * top_k, local_experts) if backend == "loop" else 1


def computed_rows(pairs: jax.Array, tile: int) -> jax.Array:
    """Kept pairs per expert [E] -> rows computed for them (rounded up to whole tiles)."""
    return pairs if tile == 1 else -(-pairs // tile) * tile


def _per_device(table: CostTable, name: str) -> jax.Array:
    return jnp.asarray(np.array([getattr(d, name) for d in table.devices], np.float32))


def predict(
    table: CostTable, topk_ids: jax.Array, keep_mask: jax.Array, residency: jax.Array | None = None
) -> Prediction:
    """Predicted per-device and layer time of executing the kept pairs.

    topk_ids, keep_mask [N, K]; residency [E] int (0 device, 1 host RAM, 2 disk; None: all on device).
    N is the batch's token count. The table is a static value: call this under jit with it closed over
    or as a static argument.
    """
    num_experts = len(table.placement)
    num_devices = table.num_devices
    placement = jnp.asarray(np.array(table.placement, np.int32))
    load = expert_load(topk_ids, keep_mask, num_experts)
    active = load.active.astype(jnp.float32)
    sig = table.signature
    tile = row_tile(sig.backend, topk_ids.shape[0], sig.num_experts_per_tok, num_experts // num_devices)
    rows = computed_rows(load.pairs, tile)
    rows_d = jax.ops.segment_sum(rows.astype(jnp.float32), placement, num_devices)
    active_d = jax.ops.segment_sum(active, placement, num_devices)
    fetch = jnp.zeros(num_experts, jnp.float32)
    if residency is not None:
        fetch_table = jnp.asarray(np.array([d.fetch_s for d in table.devices], np.float32))  # [S, tiers]
        fetch = fetch_table[placement, residency] * active
    fetch_d = jax.ops.segment_sum(fetch, placement, num_devices)
    tokens = jnp.float32(topk_ids.shape[0])
    device_s = (
        _per_device(table, "fixed_s")
        + _per_device(table, "pair_s") * rows_d
        + _per_device(table, "activation_s") * active_d
        + fetch_d
        + _per_device(table, "comm_token_s") * tokens
    )
    return Prediction(device_s, jnp.max(device_s))
