"""Predicting expert-execution time from routing with a cost table (pure jnp, static table, jit-friendly).

Device d's time for one MoE layer:

    t_d = fixed_s + pair_s * computed rows on d + activation_s * active experts on d
          + sum over active non-resident experts on d of fetch_s[tier] + comm_token_s * tokens
          + max over non-resident experts on d of offload_layer_s[tier]   (once per layer of an offloaded model)
          + max over active non-resident experts on d of offload_read_s[tier]   (once per layer that reads)

and the layer takes max_d t_d (it ends when the slowest device ends). A device's pairs are the kept
pairs routed to its experts from the whole batch: with the batch split over the expert devices too
(`data_expert` meshes), the pairs it receives from every device, whoever holds their tokens; so the
straggler CAEE prunes is the device receiving the most. Computed rows are the kept
pairs rounded up per expert to the backend's unit of saving (`ExpertBackend.row_tile`: the `loop`
backend computes an expert's pairs in whole tiles). The backend is the table's: a plan that runs
another backend with it is refused (`model/execution.py`). Letters: N tokens, K top-k, E experts,
S devices (expert shards).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from caee_jax.caee.cost_table import CostTable
from caee_jax.routing.ops import expert_load


class Prediction(NamedTuple):
    """device_s [S]: predicted time per device (s); layer_s: their maximum."""

    device_s: jax.Array
    layer_s: jax.Array


def row_tile(table: CostTable, num_tokens: int) -> int:
    """Rows an expert's pairs are computed in, for a batch of `num_tokens` on the table's mesh (its
    placement's experts: the physical slots when they are replicated, as the runtime's tile counts them)."""
    sig = table.signature
    return table.backend.row_tile(num_tokens * sig.num_experts_per_tok, len(table.placement))


def computed_rows(pairs: jax.Array, tile: int) -> jax.Array:
    """Kept pairs per expert [E] -> rows computed for them (rounded up to whole tiles)."""
    return pairs if tile == 1 else -(-pairs // tile) * tile


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
    placement = table.placement_array()
    load = expert_load(topk_ids, keep_mask, num_experts)
    active = load.active.astype(jnp.float32)
    rows = computed_rows(load.pairs, row_tile(table, topk_ids.shape[0]))
    rows_d = jax.ops.segment_sum(rows.astype(jnp.float32), placement, num_devices)
    active_d = jax.ops.segment_sum(active, placement, num_devices)
    fetch_d = offload_d = read_d = jnp.zeros(num_devices, jnp.float32)
    if residency is not None:
        fetch = table.per_device("fetch_s")[placement, residency] * active  # fetch_s [S, tiers]
        fetch_d = jax.ops.segment_sum(fetch, placement, num_devices)
        offload = table.per_device("offload_layer_s")[placement, residency]  # [E], 0 for a resident expert
        offload_d = jax.ops.segment_max(offload, placement, num_devices)  # whatever the routing: not prunable
        read = table.per_device("offload_read_s")[placement, residency] * active
        read_d = jax.ops.segment_max(read, placement, num_devices)  # saved when every miss is pruned
    tokens = jnp.float32(topk_ids.shape[0])
    device_s = (
        table.per_device("fixed_s")
        + table.per_device("pair_s") * rows_d
        + table.per_device("activation_s") * active_d
        + fetch_d
        + offload_d
        + read_d
        + table.per_device("comm_token_s") * tokens
    )
    return Prediction(device_s, jnp.max(device_s))
