"""Putting host values onto a mesh, one process or many.

Every process holds the same host value (it read the same checkpoint, or the same prompts); each
builds only the shards its own devices hold (`jax.make_array_from_callback`), so this works unchanged
when the mesh spans processes.
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from caee_jax.parallel.rules import mesh_axes, partition_spec, state_shardings


def to_mesh(value, sharding: NamedSharding) -> jax.Array:
    """A global array with `sharding` from a host value (numpy, scalar or single-device jax array)."""
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place_state(state: nnx.State, mesh: Mesh) -> nnx.State:
    """The module state with every variable sharded by its logical axes (see `rules.py`). Arrays that
    already have their target sharding (restored from a converted checkpoint) are kept as they are."""

    def place(value, sharding: NamedSharding):
        if isinstance(value, jax.Array) and value.sharding.is_equivalent_to(sharding, value.ndim):
            return value
        return to_mesh(value, sharding)

    return jax.tree.map(place, state, state_shardings(state, mesh))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) dimension over the batch's mesh axes (`data`, and `data_expert` when the mesh has
    it), the rest replicated."""
    return NamedSharding(mesh, partition_spec(("batch", *(["sequence"] * (ndim - 1))), mesh))


def batch_shards(mesh: Mesh | None) -> int:
    """How many ways the batch is split: the product of its mesh axes (1 without a mesh)."""
    return 1 if mesh is None else int(np.prod([mesh.shape[axis] for axis in mesh_axes("batch", mesh)]))


def padded_batch(mesh: Mesh | None, batch: int) -> int:
    """`batch` rounded up to a multiple of `batch_shards`: the rows to run, dummy rows last."""
    shards = batch_shards(mesh)
    return -(-batch // shards) * shards


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch(mesh: Mesh | None, batch: int) -> None:
    """A clear error when the batch cannot be split over the batch's mesh axes (callers that pad use
    `padded_batch` instead)."""
    if batch % batch_shards(mesh):
        axes = " x ".join(mesh_axes("batch", mesh))
        raise ValueError(f"batch size {batch} does not divide the mesh's {axes} axis ({batch_shards(mesh)} devices)")


def mesh_context(mesh: Mesh | None):
    """`jax.set_mesh(mesh)`, or nothing for single-device models."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def gather_replicated(x: jax.Array) -> jax.Array:
    """Inside jit: x replicated on every device of the context mesh (readable by every process)."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, P())
