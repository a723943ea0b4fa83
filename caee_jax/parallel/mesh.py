"""The one place that builds device meshes: axes `data`, then `expert` or `data_expert`, then `tensor`.

A mesh is written as text, e.g. "data=2,expert=4": omitted axes have size 1, and without a spec every
device goes on the expert axis. The second axis comes in two layouts (the rules table, `rules.py`,
says what each shards):

expert=N       routed experts split over N devices; attention, dense layers, shared experts and the
               latent cache replicated over them (each computes its data shard's whole batch).
data_expert=N  routed experts split over N devices AND the batch (with its latent cache) split over the
               same N devices: attention is data-parallel, tokens travel to their experts and back
               (DeepSeek's and SGLang's serving layout). "data=2,data_expert=4" splits the batch 8 ways
               and the experts 4 ways.

Axes are `Auto`: model code is written for one device, parameters and activations carry shardings, and
only the MoE layer uses `jax.shard_map` explicitly.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

DATA_EXPERT = "data_expert"  # the second axis in the data-parallel attention layout (module doc)
SPEC_AXES = ("data", "expert", DATA_EXPERT, "tensor")


class MeshError(ValueError):
    """A mesh spec that cannot be built on the available devices."""


def parse_mesh_spec(spec: str | dict[str, int] | None, num_devices: int | None = None) -> dict[str, int]:
    """ "data=2,expert=4" (or a dict) -> the mesh's axes and sizes in order (data, expert or data_expert,
    tensor), checked against num_devices when given."""
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
    unknown = sorted(set(sizes) - set(SPEC_AXES))
    if unknown:
        raise MeshError(f"mesh spec {spec!r}: unknown axis {unknown[0]!r}; axes are {', '.join(SPEC_AXES)}")
    if "expert" in sizes and DATA_EXPERT in sizes:
        raise MeshError(f"mesh spec {spec!r}: give expert (attention replicated) or {DATA_EXPERT} (split), not both")
    second = DATA_EXPERT if DATA_EXPERT in sizes else "expert"
    sizes = {axis: sizes.get(axis, 1) for axis in ("data", second, "tensor")}
    if any(size < 1 for size in sizes.values()):
        raise MeshError(f"mesh spec {spec!r}: axis sizes must be >= 1")
    if num_devices is not None and math.prod(sizes.values()) != num_devices:
        shape = " x ".join(f"{axis}={size}" for axis, size in sizes.items())
        raise MeshError(f"mesh spec {spec!r}: {shape} needs {math.prod(sizes.values())} devices, have {num_devices}")
    return sizes


def make_mesh(spec: str | dict[str, int] | None = None, devices=None) -> Mesh:
    """A Mesh over `devices` (default: every device of every process) with the spec's three axes."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    names, shape, types = tuple(sizes), tuple(sizes.values()), (AxisType.Auto,) * len(sizes)
    if len(devices) == len(jax.devices()):
        return jax.make_mesh(shape, names, types, devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), names, axis_types=types)


def describe(mesh: Mesh) -> str:
    """ "data=1,expert=8,tensor=1" (or "data=1,data_expert=8,tensor=1")"""
    return ",".join(f"{axis}={size}" for axis, size in mesh.shape.items())
