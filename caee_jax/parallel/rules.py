"""Logical-axis rules: which mesh axis shards each parameter role. The only table of its kind.

Every parameter carries `logical_axes` (see `model/layers.py`); `partition_spec` maps them through
LOGICAL_RULES onto the axes the mesh has (`mesh.py`: a mesh has `expert` or `data_expert`, never both).
Routed experts shard over `expert` or `data_expert`; attention heads, FFN widths and the vocabulary over
`tensor`; the batch of activations and caches over `data` and, in the data-parallel attention layout,
over `data_expert` too (the same devices as the experts); everything else is replicated.
"""

from __future__ import annotations

import math

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LOGICAL_RULES: dict[str, tuple[str, ...] | str | None] = {
    "batch": ("data", "data_expert"),
    "experts": ("expert", "data_expert"),
    "moe_ffw": "tensor",
    "moe_ffw_blocks": "tensor",  # fp8 block scales follow their columns (`routing/storage.py`)
    "embed_blocks": None,
    "ffw": "tensor",
    "shared_ffw": "tensor",
    "heads": "tensor",
    "vocab": "tensor",
    "layers": None,
    "embed": None,
    "router": None,
    "q_lora": None,
    "kv_lora": None,
    "qk_head": None,
    "v_head": None,
    "sequence": None,
    "latent": None,
    "top_k": None,
    "slots": None,  # a placed model's replica tables (`replicas.py`): small, every device routes with them
    "replicas": None,
}


class ShardingError(ValueError):
    """A tensor dimension that does not divide the mesh axis it is sharded over."""


def mesh_axes(logical: str, mesh) -> tuple[str, ...]:
    """The axes of `mesh` (a Mesh or AbstractMesh) that the logical axis shards over, in table order."""
    if logical not in LOGICAL_RULES:
        raise ShardingError(f"logical axis {logical!r} has no sharding rule")
    rule = LOGICAL_RULES[logical]
    rule = () if rule is None else (rule,) if isinstance(rule, str) else rule
    return tuple(axis for axis in rule if axis in mesh.axis_names)


def partition_spec(logical_axes: tuple[str, ...], mesh) -> PartitionSpec:
    """("layers", "experts", "embed", "moe_ffw") -> P(None, "expert", None, "tensor") on a mesh with axes
    (data, expert, tensor); ("batch", "embed") -> P(("data", "data_expert"), None) on (data, data_expert,
    tensor)."""
    specs = []
    for logical in logical_axes:
        axes = mesh_axes(logical, mesh)
        specs.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*specs)


def axes_size(mesh, axes: str | tuple[str, ...] | None) -> int:
    """Devices a dimension sharded over `axes` (one PartitionSpec entry) is split into."""
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[axis] for axis in axes)


def named_sharding(mesh: Mesh, shape: tuple[int, ...], logical_axes: tuple[str, ...], what: str) -> NamedSharding:
    """The sharding of a tensor called `what`; an error names it if a dimension does not divide its axis."""
    if len(shape) != len(logical_axes):
        raise ShardingError(f"{what}: shape {shape} and logical axes {logical_axes} differ in rank")
    spec = partition_spec(logical_axes, mesh)
    for size, logical, axis in zip(shape, logical_axes, spec, strict=True):
        if axis is not None and size % axes_size(mesh, axis):
            raise ShardingError(
                f"{what}: dimension {logical!r} of size {size} does not divide mesh axis {axis!r} of size "
                f"{axes_size(mesh, axis)}"
            )
    return NamedSharding(mesh, spec)


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """A NamedSharding for every variable of a (possibly abstract) module state, from its logical axes."""

    def sharding(path, variable):
        axes = variable.get_metadata().get("logical_axes")
        name = ".".join(map(str, path))
        if axes is None:
            raise ShardingError(f"{name}: variable has no logical_axes metadata")
        return named_sharding(mesh, variable.shape, axes, name)

    return jax.tree.map_with_path(
        lambda path, variable: variable.replace(sharding(_keys(path), variable)),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def _keys(path) -> tuple:
    return tuple(getattr(key, "key", getattr(key, "name", key)) for key in path)
