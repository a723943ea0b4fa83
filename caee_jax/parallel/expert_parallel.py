"""Expert parallelism: routed experts sharded over the mesh's expert axis, run with `jax.shard_map`.

The expert axis is `expert` or `data_expert` (`mesh.py`); each device holds E / S experts (S expert
shards), each cut to F / |tensor| columns. How tokens are laid out inside the map follows the rules
table (`rules.py`):

replicated attention (`expert`): tokens are sharded over `data` and every expert shard holds all of its
  data shard's tokens.
  gather: each expert shard runs only the pairs routed to its local experts (through `run_experts`, so
    its work follows its own kept pairs) and the partial outputs are summed with one `psum`.
  all_to_all: each expert shard takes 1/S of the tokens, exchanges their pairs (below) and all-gathers
    the combined tokens.
split attention (`data_expert`): each device holds only its 1/S of the tokens (its attention and cache).
  gather (all-gather + reduce-scatter): the shards all-gather every token, run their local pairs and
    `psum_scatter` the partial outputs back to the devices owning the tokens.
  all_to_all: each device exchanges its own tokens' pairs; no gather at the end.

The pair exchange: every kept pair is packed into a fixed-capacity slot of the destination shard that
holds its expert, slots are exchanged with `all_to_all`, run, sent back the same way and combined per
token. A pair beyond its slot capacity is dropped and counted, never silently. Either way the pairs a
device computes are those routed to its experts: what the cost model counts (`caee/cost_model.py`).

Letters: N tokens, D hidden, K top-k, E experts (E_l local), S expert shards, C slots per shard pair.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from caee_jax.choice import Choice
from caee_jax.experts import ExpertBackend, ExpertWeights, run_experts
from caee_jax.parallel.rules import axes_size, mesh_axes, partition_spec
from caee_jax.routing.ops import capacity_slots, rank_in_group
from caee_jax.routing.storage import BLOCK


class Dispatch(Choice):
    """How tokens reach the expert shards (module doc); AUTO: gather to decode, all_to_all otherwise
    (`auto_dispatch`)."""

    AUTO = "auto"
    GATHER = "gather"
    ALL_TO_ALL = "all_to_all"


def expert_parallel_mesh():
    """The context mesh (`jax.set_mesh`) when it has more than one device, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or mesh.size == 1 else mesh


def expert_axis(mesh) -> str:
    """The one axis of `mesh` the routed experts are sharded over (`expert` or `data_expert`)."""
    axes = mesh_axes("experts", mesh)
    if len(axes) != 1:
        raise ValueError(f"mesh axes {mesh.axis_names}: expected one expert axis, found {axes}")
    return axes[0]


def expert_shards(mesh) -> int:
    """S: how many ways the routed experts are split (1 without a mesh)."""
    return 1 if mesh is None else mesh.shape[expert_axis(mesh)]


def splits_tokens(mesh) -> bool:
    """True when the batch is split over the expert axis too (data-parallel attention, `data_expert`)."""
    return expert_axis(mesh) in mesh_axes("batch", mesh)


def auto_dispatch(mesh, decode: bool) -> Dispatch:
    """Dispatch.AUTO resolved per phase and layout, from measurements (`docs/RESULTS.md`, issue 16):
    replicated attention gathers to decode and exchanges pairs to prefill; split attention exchanges
    pairs in both phases."""
    if splits_tokens(mesh):
        return Dispatch.ALL_TO_ALL
    return Dispatch.GATHER if decode else Dispatch.ALL_TO_ALL


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
    device (`mesh` None) or expert-parallel over `mesh` (AUTO: `auto_dispatch` for the phase, `decode`).
    scales: fp8 weights' block scales (`run_experts`)."""
    with jax.named_scope("execute"):
        args = (x, topk_ids, topk_weights, keep_mask, weights, backend)
        if mesh is None:
            return run_experts(*args, layer_index=layer_index, scales=scales), jnp.zeros((), jnp.int32)
        if dispatch is Dispatch.AUTO:
            dispatch = auto_dispatch(mesh, decode)
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

    x [N, D] and the routing [N, K] are sharded as the rules table shards the batch (N divisible by its
    shards); weights as it shards them (experts over the expert axis, width over `tensor`); dispatch
    GATHER or ALL_TO_ALL (module doc); layer_index: int scalar when weights hold every layer ([L, E, ...]);
    scales: fp8 block scales, sharded with their experts and columns (a width shard must hold whole
    128-column blocks).
    """
    dispatch = Dispatch.parse(dispatch, "dispatch")
    if dispatch is Dispatch.AUTO:
        raise ValueError("run_experts_parallel needs a concrete dispatch: gather or all_to_all")
    mesh = jax.sharding.get_abstract_mesh()
    num_experts = weights.gate.shape[-3]
    axes = _Axes(mesh)
    shards = mesh.shape[axes.expert]
    if num_experts % shards:
        raise ValueError(
            f"n_routed_experts={num_experts} does not divide the mesh's {axes.expert} axis ({shards} devices)"
        )
    token_shards = axes_size(mesh, axes.batch)
    if x.shape[0] % token_shards:
        where = " x ".join(axes.batch)
        raise ValueError(f"{x.shape[0]} tokens do not divide the mesh's {where} axis ({token_shards} devices)")
    lead = () if layer_index is None else ("layers",)
    in_ffw, out_ffw = (*lead, "experts", "embed", "moe_ffw"), (*lead, "experts", "moe_ffw", "embed")
    spec = functools.partial(partition_spec, mesh=mesh)
    weight_specs = ExpertWeights(spec(in_ffw), spec(in_ffw), spec(out_ffw))
    tokens, routing, scalar = spec(("batch", "embed")), spec(("batch", "top_k")), spec(())

    scale_specs = None
    if scales is not None:
        _check_block_columns(weights.gate.shape[-1], axes_size(mesh, axes.width), axes.width)
        in_blocks = (*lead, "experts", "embed_blocks", "moe_ffw_blocks")
        out_blocks = (*lead, "experts", "moe_ffw_blocks", "embed_blocks")
        scale_specs = ExpertWeights(spec(in_blocks), spec(in_blocks), spec(out_blocks))

    tile = backend.row_tile(topk_ids.size, num_experts)  # the whole batch's pairs over all experts

    def local(x, topk_ids, topk_weights, keep_mask, weights, layer_index, scales):
        run = functools.partial(
            run_experts, backend=backend, layer_index=layer_index if lead else None, scales=scales, tile_rows=tile
        )
        routed = (x, topk_ids, topk_weights, keep_mask, weights, run)
        if dispatch is Dispatch.GATHER:
            return _gather_local(*routed, axes), jnp.zeros((), jnp.int32)
        return _all_to_all_local(*routed, axes, capacity_factor)

    mapped = jax.shard_map(
        local,
        in_specs=(tokens, routing, routing, routing, weight_specs, scalar, scale_specs),
        out_specs=(tokens, scalar),
        # The backends' loop carries start as unsharded zeros; varying-axis typing would reject them.
        check_vma=False,
    )
    layer_index = jnp.zeros((), jnp.int32) if layer_index is None else layer_index
    return mapped(x, topk_ids, topk_weights, keep_mask, weights, layer_index, scales)


def _check_block_columns(width: int, shards: int, axes: tuple[str, ...]) -> None:
    """fp8 experts cut over the width axes: each shard's F / shards columns must be whole scale blocks."""
    if shards > 1 and (width % shards or (width // shards) % BLOCK[1]):
        raise ValueError(
            f"fp8 experts of width {width} cannot be cut over {shards} {' x '.join(axes)} devices: each shard's "
            f"columns must be whole {BLOCK[1]}-column blocks of the block scales"
        )


class _Axes:
    """The mesh axes a layer's collectives run over, from the rules table: expert (one name), batch and
    width (tuples; width only axes of more than one device, possibly none); split: tokens sharded over
    the expert axis too."""

    def __init__(self, mesh):
        self.expert = expert_axis(mesh)
        self.batch = mesh_axes("batch", mesh)
        self.width = tuple(axis for axis in mesh_axes("moe_ffw", mesh) if mesh.shape[axis] > 1)
        self.split = self.expert in self.batch


def _local_ids(topk_ids, num_local: int, axis: str):
    """Global expert ids -> (ids on this expert shard, mask of the pairs this shard holds)."""
    local = topk_ids - jax.lax.axis_index(axis) * num_local
    mine = (local >= 0) & (local < num_local)
    return jnp.where(mine, local, 0), mine


def _gather_local(x, topk_ids, topk_weights, keep_mask, weights, run, axes: _Axes):
    """gather: this shard's pairs of every token its data shard holds; split attention all-gathers the
    tokens first [N_local * S, ...] and reduce-scatters the partial outputs back to [N_local, D]."""
    if axes.split:  # one all-gather: the routing travels as int32 bits beside the tokens
        k = topk_ids.shape[1]
        routing = [topk_ids, jax.lax.bitcast_convert_type(topk_weights.astype(jnp.float32), jnp.int32), keep_mask]
        packed = jax.lax.all_gather(_pack(x, jnp.concatenate(routing, 1).astype(jnp.int32)), axes.expert, tiled=True)
        x, routing = _unpack(packed, x.shape[1])
        topk_ids, topk_weights = routing[:, :k], jax.lax.bitcast_convert_type(routing[:, k : 2 * k], jnp.float32)
        keep_mask = routing[:, 2 * k :].astype(bool)
    local_ids, mine = _local_ids(topk_ids, weights.gate.shape[-3], axes.expert)
    y = run(x, local_ids, topk_weights, keep_mask & mine, weights)
    if axes.split:
        y = jax.lax.psum_scatter(y, axes.expert, scatter_dimension=0, tiled=True)
        return jax.lax.psum(y, axes.width) if axes.width else y
    return jax.lax.psum(y, (axes.expert, *axes.width))


def _pack(x: jax.Array, ints: jax.Array) -> jax.Array:
    """x [n, D] and ints [n, m] int32 -> [n, D + m * 4 / itemsize] in x's dtype, the ints as raw bits: one
    collective moves both (collectives copy bytes, so the bits arrive intact)."""
    bits = jax.lax.bitcast_convert_type(ints, x.dtype)  # [n, m] or, for 2-byte dtypes, [n, m, 2]
    return jnp.concatenate([x, bits.reshape(x.shape[0], -1)], axis=1)


def _unpack(packed: jax.Array, dim: int) -> tuple[jax.Array, jax.Array]:
    """`_pack`'s inverse: [n, D + ...] -> (x [n, D], ints [n, m] int32)."""
    bits = packed[:, dim:]
    per_int = 4 // packed.dtype.itemsize
    if per_int > 1:
        bits = bits.reshape(bits.shape[0], -1, per_int)
    return packed[:, :dim], jax.lax.bitcast_convert_type(bits, jnp.int32)


def slots_per_shard(pairs: int, shards: int, capacity_factor: float | None) -> int:
    """all_to_all capacity C per (source, destination) shard pair for `pairs` = tokens x K at the source."""
    if capacity_factor is None:
        return pairs  # every pair of a source could go to one destination
    return max(1, min(pairs, capacity_slots(pairs, shards, capacity_factor)))


def _all_to_all_local(x, topk_ids, topk_weights, keep_mask, weights, run, axes, capacity_factor):
    """all_to_all: the pairs of this device's tokens (split attention: all it holds; replicated: its 1/S
    of them) exchanged with the expert shards; replicated attention all-gathers the combined tokens."""
    num_tokens = x.shape[0]
    routed = (x, topk_ids, topk_weights, keep_mask)
    if not axes.split:
        # This shard's share of the tokens (rows padded to a multiple of the shard count are never kept).
        shards = jax.lax.axis_size(axes.expert)
        per_shard = -(-num_tokens // shards)
        pad = per_shard * shards - num_tokens
        start = jax.lax.axis_index(axes.expert) * per_shard

        def mine(a, fill):
            a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1), constant_values=fill)
            return jax.lax.dynamic_slice_in_dim(a, start, per_shard)

        routed = (mine(a, fill) for a, fill in zip(routed, (0, 0, 0, False), strict=True))
    y, dropped = _exchange_pairs(*routed, weights, run, axes.expert, capacity_factor)
    y = jax.lax.psum(y, axes.width) if axes.width else y
    if not axes.split:
        y = jax.lax.all_gather(y, axes.expert, tiled=True)[:num_tokens]
    unique = tuple(dict.fromkeys((*axes.batch, axes.expert)))
    return y.astype(x.dtype), jax.lax.psum(dropped, unique)


def _exchange_pairs(xs, ids, gate_w, keep, weights, run, axis: str, capacity_factor):
    """The pairs of tokens xs [n, D] (routing [n, K]) run on the shards holding their experts -> (combined
    outputs [n, D] f32, partial over the width axis; this device's dropped pairs: int32)."""
    shards = jax.lax.axis_size(axis)
    num_local = weights.gate.shape[-3]
    per_shard, k = ids.shape
    dim = xs.shape[-1]

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

    send_x = jnp.zeros((shards * capacity, dim), xs.dtype).at[slot].set(xs[token], mode="drop")
    send_id = jnp.full((shards * capacity, 1), -1, jnp.int32).at[slot, 0].set(ids.reshape(-1) % num_local, mode="drop")

    def exchange(a):
        return jax.lax.all_to_all(a, axis, 0, 0, tiled=True)

    recv_x, recv_id = _unpack(exchange(_pack(send_x, send_id)), dim)  # one exchange; id -1: an empty slot
    recv_id = recv_id[:, 0]

    ones = jnp.ones((shards * capacity, 1), jnp.float32)
    recv = (recv_x, jnp.maximum(recv_id, 0)[:, None], ones, recv_id[:, None] >= 0)
    out = run(*recv, weights)
    back = exchange(out)  # [S*C, D]: row dest*C + rank holds this shard's pair output
    contrib = back[jnp.minimum(slot, shards * capacity - 1)].astype(jnp.float32) * jnp.where(sent, pair_w, 0)[:, None]
    return jnp.zeros((per_shard, dim), jnp.float32).at[token].add(contrib), dropped
