"""The one place that builds device meshes: axes `data`, `expert`, `tensor` (in that order).

A mesh is written as text, e.g. "data=2,expert=4": omitted axes have size 1, and without a spec every
device goes on the expert axis. Axes are `Auto`: model code is written for one device, parameters and
activations carry shardings, and only the MoE layer uses `jax.shard_map` explicitly.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "expert", "tensor")


class MeshError(ValueError):
    """A mesh spec that cannot be built on the available devices."""


def parse_mesh_spec(spec: str | dict[str, int] | None, num_devices: int | None = None) -> dict[str, int]:
    """ "data=2,expert=4" (or a dict) -> sizes for every axis in MESH_AXES, checked against num_devices
    when given."""
    if spec is None or spec == "":
        if num_devices is None:
            raise MeshError("an empty mesh spec needs a device count")
        return {"data": 1, "expert": num_devices, "tensor": 1}
    if isinstance(spec, str):
        sizes = {}
        for part in spec.split(","):
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep or not value.strip().isdigit():
                raise MeshError(f"mesh spec {spec!r}: {part!r} is not axis=size")
            if name in sizes:
                raise MeshError(f"mesh spec {spec!r}: axis {name!r} given twice")
            sizes[name] = int(value)
    else:
        sizes = dict(spec)
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise MeshError(f"mesh spec {spec!r}: unknown axis {unknown[0]!r}; axes are {', '.join(MESH_AXES)}")
    sizes = {axis: sizes.get(axis, 1) for axis in MESH_AXES}
    if any(size < 1 for size in sizes.values()):
        raise MeshError(f"mesh spec {spec!r}: axis sizes must be >= 1")
    if num_devices is not None and math.prod(sizes.values()) != num_devices:
        shape = " x ".join(f"{axis}={size}" for axis, size in sizes.items())
        raise MeshError(f"mesh spec {spec!r}: {shape} needs {math.prod(sizes.values())} devices, have {num_devices}")
    return sizes


def make_mesh(spec: str | dict[str, int] | None = None, devices=None) -> Mesh:
    """A Mesh over `devices` (default: every device of every process) with axes MESH_AXES."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    shape = tuple(sizes[axis] for axis in MESH_AXES)
    if len(devices) == len(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, (AxisType.Auto,) * len(MESH_AXES), devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def describe(mesh: Mesh) -> str:
    """ "data=1,expert=8,tensor=1" """
    return ",".join(f"{axis}={size}" for axis, size in mesh.shape.items())
