"""Functions of a batch split over devices, run per device under `jax.shard_map`.

XLA partitions most per-row work along a split batch by itself, but not every op: `lax.top_k` (the
router) is all-gathered first, three collectives per MoE layer and step. `rowwise` runs such a function
on each device's own rows instead: no collective at all. A function of the whole batch (a pruning
decision that ranks pairs across tokens, e.g. CAEE or `capacity`) left to XLA costs a collective per
sort, cumsum and scatter (measured: +50-65% decode step on 2 processes); `batchwide` all-gathers its
rows once instead, computes on every device and keeps each device's own rows of the result.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from caee_jax.parallel.rules import axes_size, partition_spec


def _split_batch():
    """The context mesh's batch PartitionSpec when it splits the batch over more than one device, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    batch = partition_spec(("batch",), mesh)
    return batch if axes_size(mesh, batch[0]) > 1 else None


def _present(fn, rows: tuple, shared: tuple):
    """(fn', rows', shared') with the None entries of rows and shared left out, and put back as None
    before fn is called: optional inputs pass through a `shard_map`, which takes arrays only."""
    where = [a is not None for a in (*rows, *shared)]

    def call(*arrays):
        given = iter(arrays)
        return fn(*(next(given) if present else None for present in where))

    return call, tuple(a for a in rows if a is not None), tuple(a for a in shared if a is not None)


def rowwise(fn, rows: tuple, shared: tuple = ()):
    """fn(*rows, *shared) on each device's own rows (leading dimension: the batch's tokens, split as the
    rules table splits the batch; `shared` replicated; None entries pass through as None) under a context
    mesh that splits the batch, else directly: the one-device result when every output row depends only on
    the same row of each input."""
    batch = _split_batch()
    if batch is None:
        return fn(*rows, *shared)
    fn, rows, shared = _present(fn, rows, shared)
    specs = (batch,) * len(rows) + (PartitionSpec(),) * len(shared)
    return jax.shard_map(fn, in_specs=specs, out_specs=batch)(*rows, *shared)


def batchwide(fn, rows: tuple, shared: tuple = ()):
    """fn(*rows, *shared) for a function of the whole batch whose outputs have one row per token (leading
    dimension, split as the rules table splits the batch). rows: int32, float32 or bool arrays [N, ...];
    shared: replicated; None entries of either pass through as None. Under a context mesh that splits the
    batch every device all-gathers the rows in one collective (packed as int32 bits), computes fn on the
    whole batch and keeps its own rows of the outputs: the one-device result, one collective; else fn
    directly."""
    batch = _split_batch()
    if batch is None:
        return fn(*rows, *shared)
    fn, rows, shared = _present(fn, rows, shared)
    axes = batch[0]

    def local(*args):
        mine, common = args[: len(rows)], args[len(rows) :]
        count = mine[0].shape[0]
        widths = [int(np.prod(a.shape[1:])) for a in mine]
        packed = jnp.concatenate([_as_int32(a).reshape(count, -1) for a in mine], axis=1)
        whole = jax.lax.all_gather(packed, axes, tiled=True)  # [N, sum(widths)], devices in `axes` order
        columns = np.cumsum([0, *widths])
        gathered = [
            _from_int32(whole[:, start:stop], a).reshape(-1, *a.shape[1:])
            for a, start, stop in zip(mine, columns[:-1], columns[1:], strict=True)
        ]
        start = jax.lax.axis_index(axes) * count
        return jax.tree.map(lambda out: jax.lax.dynamic_slice_in_dim(out, start, count), fn(*gathered, *common))

    specs = (batch,) * len(rows) + (PartitionSpec(),) * len(shared)
    return jax.shard_map(local, in_specs=specs, out_specs=batch)(*rows, *shared)


def _as_int32(a: jax.Array) -> jax.Array:
    if a.dtype == jnp.float32:
        return jax.lax.bitcast_convert_type(a, jnp.int32)
    if a.dtype in (jnp.int32, jnp.bool_):
        return a.astype(jnp.int32)
    raise TypeError(f"batchwide gathers int32, float32 or bool rows, got {a.dtype}")


def _from_int32(bits: jax.Array, like: jax.Array) -> jax.Array:
    if like.dtype == jnp.float32:
        return jax.lax.bitcast_convert_type(bits, jnp.float32)
    return bits.astype(like.dtype)
