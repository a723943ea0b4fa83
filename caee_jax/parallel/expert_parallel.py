"""Expert parallelism: routed experts sharded over the mesh's `expert` axis, run with `jax.shard_map`.

Inside the map, tokens are sharded over `data` and replicated over `expert` and `tensor`; each device
holds E / |expert| experts, each cut to F / |tensor| columns. Two dispatch patterns:

gather (decode): every expert shard already sees all of its data shard's tokens. It runs only the pairs
  routed to its local experts (through `run_experts`, so its work follows its own kept pairs) and the
  partial outputs are summed with one `psum` over (expert, tensor).
all_to_all (prefill): each expert shard takes 1/|expert| of the tokens, packs every kept pair into a
  fixed-capacity slot of the destination shard that holds its expert, exchanges slots with
  `all_to_all`, runs them, sends the outputs back the same way, combines them per token and
  all-gathers the tokens. A pair beyond its slot capacity is dropped and counted, never silently.

Letters: N tokens, D hidden, K top-k, E experts (E_l local), S expert shards, C slots per shard pair.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from caee_jax.choice import Choice
from caee_jax.experts import ExpertBackend, ExpertWeights, run_experts
from caee_jax.parallel.rules import LOGICAL_RULES, partition_spec
from caee_jax.routing.ops import capacity_slots, rank_in_group
from caee_jax.routing.storage import BLOCK

# The mesh axes the collectives run over, from the one rules table.
EXPERT_AXIS, WIDTH_AXIS, BATCH_AXIS = (LOGICAL_RULES[role] for role in ("experts", "moe_ffw", "batch"))


class Dispatch(Choice):
    """How tokens reach the expert shards (module doc); AUTO: gather to decode, all_to_all otherwise."""

    AUTO = "auto"
    GATHER = "gather"
    ALL_TO_ALL = "all_to_all"


def expert_parallel_mesh():
    """The context mesh (`jax.set_mesh`) when it has more than one device, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or mesh.size == 1 else mesh


def execute(
    x: jax.Array,
    topk_ids: jax.Array,
    topk_weights: jax.Array,
    keep_mask: jax.Array,
    weights: ExpertWeights,
    backend: ExpertBackend,
    *,
    mesh,
    dispatch: Dispatch,
    capacity_factor: float | None,
    layer_index: jax.Array | None,
    decode: bool,
    scales: ExpertWeights | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The execute stage: the routed experts on x [N, D] -> (y [N, D], dropped pairs: int32 scalar), on one
    device (`mesh` None) or expert-parallel over `mesh` (AUTO: gather when `decode`, else all_to_all).
    scales: fp8 weights' block scales (`run_experts`)."""
    with jax.named_scope("execute"):
        args = (x, topk_ids, topk_weights, keep_mask, weights, backend)
        if mesh is None:
            return run_experts(*args, layer_index=layer_index, scales=scales), jnp.zeros((), jnp.int32)
        if dispatch is Dispatch.AUTO:
            dispatch = Dispatch.GATHER if decode else Dispatch.ALL_TO_ALL
        return run_experts_parallel(
            *args, dispatch=dispatch, capacity_factor=capacity_factor, layer_index=layer_index, scales=scales
        )


def run_experts_parallel(
    x: jax.Array,
    topk_ids: jax.Array,
    topk_weights: jax.Array,
    keep_mask: jax.Array,
    weights: ExpertWeights,
    backend: ExpertBackend,
    *,
    dispatch: Dispatch | str,
    capacity_factor: float | None = None,
    layer_index: jax.Array | None = None,
    scales: ExpertWeights | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Like `run_experts` over the context mesh. Returns (y [N, D], dropped pairs: int32 scalar).

    x [N, D] and the routing [N, K] are sharded over `data` (N divisible by its size); weights as the
    logical-axis rules shard them (experts over `expert`, width over `tensor`); dispatch GATHER or
    ALL_TO_ALL; layer_index: int scalar when weights hold every layer ([L, E, ...]); scales: fp8 block
    scales, sharded with their experts and columns (a width shard must hold whole 128-column blocks).
    """
    dispatch = Dispatch.parse(dispatch, "dispatch")
    if dispatch is Dispatch.AUTO:
        raise ValueError("run_experts_parallel needs a concrete dispatch: gather or all_to_all")
    mesh = jax.sharding.get_abstract_mesh()
    num_experts = weights.gate.shape[-3]
    shards = mesh.shape[EXPERT_AXIS]
    if num_experts % shards:
        raise ValueError(f"n_routed_experts={num_experts} does not divide the mesh's expert axis ({shards} devices)")
    if x.shape[0] % mesh.shape[BATCH_AXIS]:
        raise ValueError(f"{x.shape[0]} tokens do not divide the mesh's data axis ({mesh.shape[BATCH_AXIS]} devices)")
    lead = () if layer_index is None else ("layers",)
    in_ffw, out_ffw = (*lead, "experts", "embed", "moe_ffw"), (*lead, "experts", "moe_ffw", "embed")
    weight_specs = ExpertWeights(partition_spec(in_ffw), partition_spec(in_ffw), partition_spec(out_ffw))
    tokens, routing, scalar = partition_spec(("batch", "embed")), partition_spec(("batch", "top_k")), partition_spec(())
    scale_specs = None
    if scales is not None:
        _check_block_columns(weights.gate.shape[-1], mesh.shape[WIDTH_AXIS])
        in_blocks = (*lead, "experts", "embed_blocks", "moe_ffw_blocks")
        out_blocks = (*lead, "experts", "moe_ffw_blocks", "embed_blocks")
        scale_specs = ExpertWeights(partition_spec(in_blocks), partition_spec(in_blocks), partition_spec(out_blocks))

    def local(x, topk_ids, topk_weights, keep_mask, weights, layer_index, scales):
        run = functools.partial(run_experts, backend=backend, layer_index=layer_index if lead else None, scales=scales)
        if dispatch is Dispatch.GATHER:
            return _gather_local(x, topk_ids, topk_weights, keep_mask, weights, run), jnp.zeros((), jnp.int32)
        return _all_to_all_local(x, topk_ids, topk_weights, keep_mask, weights, run, capacity_factor)

    mapped = jax.shard_map(
        local,
        in_specs=(tokens, routing, routing, routing, weight_specs, scalar, scale_specs),
        out_specs=(tokens, scalar),
        # The backends' loop carries start as unsharded zeros; varying-axis typing would reject them.
        check_vma=False,
    )
    layer_index = jnp.zeros((), jnp.int32) if layer_index is None else layer_index
    return mapped(x, topk_ids, topk_weights, keep_mask, weights, layer_index, scales)


def _check_block_columns(width: int, shards: int) -> None:
    """fp8 experts cut over the width axis: each shard's F / shards columns must be whole scale blocks."""
    if shards > 1 and (width % shards or (width // shards) % BLOCK[1]):
        raise ValueError(
            f"fp8 experts of width {width} cannot be cut over {shards} '{WIDTH_AXIS}' devices: each shard's "
            f"columns must be whole {BLOCK[1]}-column blocks of the block scales"
        )


def _local_ids(topk_ids, num_local: int):
    """Global expert ids -> (ids on this expert shard, mask of the pairs this shard holds)."""
    local = topk_ids - jax.lax.axis_index(EXPERT_AXIS) * num_local
    mine = (local >= 0) & (local < num_local)
    return jnp.where(mine, local, 0), mine


def _gather_local(x, topk_ids, topk_weights, keep_mask, weights, run):
    num_local = weights.gate.shape[-3]
    local_ids, mine = _local_ids(topk_ids, num_local)
    y = run(x, local_ids, topk_weights, keep_mask & mine, weights)
    return jax.lax.psum(y, (EXPERT_AXIS, WIDTH_AXIS))


def slots_per_shard(pairs: int, shards: int, capacity_factor: float | None) -> int:
    """all_to_all capacity C per (source, destination) shard pair for `pairs` = tokens x K at the source."""
    if capacity_factor is None:
        return pairs  # every pair of a source could go to one destination
    return max(1, min(pairs, capacity_slots(pairs, shards, capacity_factor)))


def _all_to_all_local(x, topk_ids, topk_weights, keep_mask, weights, run, capacity_factor):
    shards = jax.lax.axis_size(EXPERT_AXIS)
    num_local = weights.gate.shape[-3]
    num_tokens, k = topk_ids.shape
    dim = x.shape[-1]
    # This shard's share of the tokens (rows padded to a multiple of the shard count are never kept).
    per_shard = -(-num_tokens // shards)
    pad = per_shard * shards - num_tokens
    start = jax.lax.axis_index(EXPERT_AXIS) * per_shard

    def mine(a, fill):
        a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1), constant_values=fill)
        return jax.lax.dynamic_slice_in_dim(a, start, per_shard)

    xs, ids, gate_w, keep = mine(x, 0), mine(topk_ids, 0), mine(topk_weights, 0), mine(keep_mask, False)

    # Slot of every kept pair at its destination shard: highest gate weight first, C slots per source.
    num_pairs = per_shard * k
    capacity = slots_per_shard(num_pairs, shards, capacity_factor)
    dest = jnp.where(keep, ids // num_local, shards).reshape(-1)  # [P]; shards = not sent
    pair_w = gate_w.reshape(-1)
    rank = rank_in_group(dest, pair_w, shards)
    routed = dest < shards
    sent = routed & (rank < capacity)
    dropped = jnp.sum(routed & ~sent).astype(jnp.int32)
    slot = jnp.where(sent, dest * capacity + rank, shards * capacity)  # out of range: not written
    token = jnp.arange(num_pairs) // k

    send_x = jnp.zeros((shards * capacity, dim), x.dtype).at[slot].set(xs[token], mode="drop")
    send_id = jnp.zeros((shards * capacity,), jnp.int32).at[slot].set(ids.reshape(-1) % num_local, mode="drop")
    send_ok = jnp.zeros((shards * capacity,), bool).at[slot].set(True, mode="drop")

    def exchange(a):
        return jax.lax.all_to_all(a, EXPERT_AXIS, 0, 0, tiled=True)

    recv_x, recv_id, recv_ok = exchange(send_x), exchange(send_id), exchange(send_ok)

    ones = jnp.ones((shards * capacity, 1), jnp.float32)
    out = run(recv_x, recv_id[:, None], ones, recv_ok[:, None], weights)
    back = exchange(out)  # [S*C, D]: row dest*C + rank holds this shard's pair output
    contrib = back[jnp.minimum(slot, shards * capacity - 1)].astype(jnp.float32) * jnp.where(sent, pair_w, 0)[:, None]
    y = jnp.zeros((per_shard, dim), jnp.float32).at[token].add(contrib)
    y = jax.lax.psum(y, WIDTH_AXIS)
    y = jax.lax.all_gather(y, EXPERT_AXIS, tiled=True)[:num_tokens]
    return y.astype(x.dtype), jax.lax.psum(dropped, (BATCH_AXIS, EXPERT_AXIS))
