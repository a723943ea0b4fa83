"""Row-wise functions on a batch split over devices: run per device under `jax.shard_map`.

XLA partitions most per-row work along a split batch by itself, but not every op: `lax.top_k` (the
router) is all-gathered first, three collectives per MoE layer and step. `rowwise` runs such a function
on each device's own rows instead: no collective at all.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec

from caee_jax.parallel.rules import axes_size, partition_spec


def rowwise(fn, rows: tuple, shared: tuple = ()):
    """fn(*rows, *shared), where every output row depends only on the same row of each `rows` array
    (leading dimension: the batch's tokens, split as the rules table splits the batch) and `shared` are
    replicated; per device under the context mesh when it splits the batch, else directly."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or axes_size(mesh, partition_spec(("batch",), mesh)[0]) == 1:
        return fn(*rows, *shared)
    batch = partition_spec(("batch",), mesh)
    specs = (batch,) * len(rows) + (PartitionSpec(),) * len(shared)
    return jax.shard_map(fn, in_specs=specs, out_specs=batch)(*rows, *shared)
