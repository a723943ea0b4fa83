"""What a model needs per device on a mesh: parameters and latent KV cache, from the sharded abstract model.

Nothing is allocated: the model is built with `eval_shape`, every parameter gets its sharding from the
logical-axis rules, and each device's bytes are summed over the slices it actually holds
(`devices_indices_map`). The decode step is also traced and lowered on the mesh, so a plan only
succeeds for a model that really shards there.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from caee_jax.config import ModelConfig
from caee_jax.model.cache import LatentCache
from caee_jax.model.execution import Execution
from caee_jax.parallel.mesh import describe
from caee_jax.parallel.placement import batch_sharding
from caee_jax.parallel.rules import partition_spec, state_shardings
from caee_jax.routing.storage import Storage
from caee_jax.runtime import steps
from caee_jax.weights.hf_loader import abstract_model

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class DevicePlan:
    """One device's share, bytes: parameters (routed experts among them) and latent cache."""

    device: int
    process: int
    param_bytes: int
    expert_param_bytes: int
    cache_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.cache_bytes


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    mesh: str
    dtype: str
    weights: str
    batch: int
    context: int
    total_params: int
    device_memory_bytes: int
    devices: list[DevicePlan]

    @property
    def max_device_bytes(self) -> int:
        return max(d.total_bytes for d in self.devices)

    @property
    def fits(self) -> bool:
        return self.max_device_bytes <= self.device_memory_bytes

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        for row in out["devices"]:
            row["total_bytes"] = row["param_bytes"] + row["cache_bytes"]
            row["fits"] = row["total_bytes"] <= self.device_memory_bytes
        out.update(max_device_bytes=self.max_device_bytes, fits=self.fits)
        return out


def plan_memory(
    config: ModelConfig,
    mesh: Mesh,
    *,
    dtype=jnp.bfloat16,
    weights: Storage | str | None = None,
    batch: int,
    context: int,
    device_memory_bytes: int,
) -> MemoryPlan:
    """Per-device parameter and cache bytes of `config` on `mesh` at `batch` sequences of `context` tokens;
    weights: the routed experts' storage ("f32", "bf16", "fp8" with its block scales; None: dtype)."""
    weights = None if weights is None else Storage.parse(weights, "weights")
    graphdef, state = nnx.split(abstract_model(config, dtype, weights))
    shardings = state_shardings(state, mesh)
    cache_sharding = NamedSharding(mesh, partition_spec(("layers", "batch"), mesh))
    cache = LatentCache(
        *(
            jax.ShapeDtypeStruct((layers, batch, context, config.latent_dim), dtype, sharding=cache_sharding)
            for layers in (config.num_dense_layers, config.num_moe_layers)
        )
    )
    _lower_decode_step(graphdef, state, shardings, cache, mesh)

    index = {device: i for i, device in enumerate(mesh.devices.flat)}
    params = np.zeros(len(index), np.int64)
    experts = np.zeros(len(index), np.int64)
    cached = np.zeros(len(index), np.int64)
    total_params = 0
    flat_shardings = dict(nnx.to_flat_state(shardings))
    for path, variable in nnx.to_flat_state(state):
        total_params += math.prod(variable.shape)
        held = _bytes_per_device(variable.shape, variable.dtype, flat_shardings[path].get_value(), index)
        params += held
        if "experts" in variable.get_metadata()["logical_axes"]:
            experts += held
    for part in cache:
        cached += _bytes_per_device(part.shape, part.dtype, part.sharding, index)
    devices = [
        DevicePlan(i, device.process_index, int(params[i]), int(experts[i]), int(cached[i]))
        for device, i in index.items()
    ]
    stored = jnp.dtype(dtype).name if weights is None else weights.value
    name = jnp.dtype(dtype).name
    return MemoryPlan(describe(mesh), name, stored, batch, context, total_params, device_memory_bytes, devices)


def _bytes_per_device(shape, dtype, sharding: NamedSharding, index: dict) -> np.ndarray:
    """Bytes of the slice each device holds (replicas counted on every device that keeps one)."""
    out = np.zeros(len(index), np.int64)
    itemsize = jnp.dtype(dtype).itemsize
    for device, slices in sharding.devices_indices_map(tuple(shape)).items():
        out[index[device]] += itemsize * math.prod(
            len(range(*s.indices(n))) for s, n in zip(slices, shape, strict=True)
        )
    return out


def _lower_decode_step(graphdef, state, shardings, cache: LatentCache, mesh: Mesh) -> None:
    """Traces and lowers one sharded decode step (fails if the model cannot run on this mesh)."""
    abstract = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), state, shardings)
    rows = jax.ShapeDtypeStruct(cache.moe.shape[1:2], jnp.int32, sharding=batch_sharding(mesh, 1))  # [B]
    sampling = [jax.ShapeDtypeStruct((), dtype) for dtype in (jnp.uint32, jnp.int32, jnp.float32, jnp.float32)]
    with jax.set_mesh(mesh):
        steps.decode_step.trace(graphdef, abstract, cache, rows, rows, *sampling, execution=Execution()).lower()
