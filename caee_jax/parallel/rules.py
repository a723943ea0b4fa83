"""Logical-axis rules: which mesh axis shards each parameter role. The only table of its kind.

Every parameter carries `logical_axes` (see `model/layers.py`); `partition_spec` maps them through
LOGICAL_RULES. Routed experts shard over `expert`; attention heads, FFN widths and the vocabulary over
`tensor`; the batch of activations and caches over `data`; everything else is replicated.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LOGICAL_RULES: dict[str, str | None] = {
    "batch": "data",
    "experts": "expert",
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
}


class ShardingError(ValueError):
    """A tensor dimension that does not divide the mesh axis it is sharded over."""


def partition_spec(logical_axes: tuple[str, ...]) -> PartitionSpec:
    """("layers", "experts", "embed", "moe_ffw") -> P(None, "expert", None, "tensor")."""
    unknown = [axis for axis in logical_axes if axis not in LOGICAL_RULES]
    if unknown:
        raise ShardingError(f"logical axis {unknown[0]!r} has no sharding rule")
    return PartitionSpec(*(LOGICAL_RULES[axis] for axis in logical_axes))


def named_sharding(mesh: Mesh, shape: tuple[int, ...], logical_axes: tuple[str, ...], what: str) -> NamedSharding:
    """The sharding of a tensor called `what`; an error names it if a dimension does not divide its axis."""
    if len(shape) != len(logical_axes):
        raise ShardingError(f"{what}: shape {shape} and logical axes {logical_axes} differ in rank")
    spec = partition_spec(logical_axes)
    for size, logical, axis in zip(shape, logical_axes, spec, strict=True):
        if axis is not None and size % mesh.shape[axis]:
            raise ShardingError(
                f"{what}: dimension {logical!r} of size {size} does not divide mesh axis {axis!r} of size "
                f"{mesh.shape[axis]}"
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
