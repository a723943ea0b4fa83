"""Expert stores: every routed expert's weights, readable one expert at a time, off the device.

A store holds, for each MoE layer l and routed expert e, the SwiGLU weights gate, up [D, F] and down
[F, D] in the model's dtype. The device-side expert cache (`cache.py`) reads the experts it misses
from a store; the store's tier prices those reads in the cost table (`fetch_s[tier]`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from caee_jax.caee.cost_table import TIERS
from caee_jax.config import ModelConfig
from caee_jax.routing.backend import ExpertWeights

EXPERT_PATHS = {"gate": ("moe_layers", "ffn", "gate_proj"), "up": ("moe_layers", "ffn", "up_proj")}
EXPERT_PATHS["down"] = ("moe_layers", "ffn", "down_proj")


class StoreError(ValueError):
    """An expert store that is missing, damaged, or made for another model."""


def expert_stacks(state: nnx.State) -> ExpertWeights:
    """The routed-expert stacks of a model state as they are (device arrays): gate, up [L, E, D, F],
    down [L, E, F, D]."""
    flat = dict(nnx.to_flat_state(state))
    return ExpertWeights(*(flat[EXPERT_PATHS[name]].get_value() for name in ExpertWeights._fields))


class ExpertStore:
    """Read access to every routed expert of a model. tier: "host" or "disk" (an index of TIERS)."""

    tier: str

    def __init__(self, config: ModelConfig, dtype):
        self.config = config
        self.dtype = np.dtype(dtype)

    @property
    def tier_index(self) -> int:
        """The residency code of this store's experts in the cost model (1 host RAM, 2 disk)."""
        return TIERS.index(self.tier)

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert's three matrices."""
        c = self.config
        return 3 * c.hidden_size * c.moe_intermediate_size * self.dtype.itemsize

    def read(self, layer: int, expert: int) -> ExpertWeights:
        """Expert `expert` of MoE layer `layer` (0-based among MoE layers) as numpy gate, up [D, F], down [F, D]."""
        raise NotImplementedError

    def read_many(self, layer: int, experts: Sequence[int]) -> list[ExpertWeights]:
        """Several experts of one layer (a store may read them concurrently)."""
        return [self.read(layer, e) for e in experts]

    def reopen(self) -> ExpertStore:
        """Another reader of the same experts with state of its own (descriptor, read pool, prefetch
        staging): what one reader reads or stages never reaches the other (e.g. two sides of a comparison)."""
        raise NotImplementedError

    def close(self) -> None:
        """Releases files and threads (a no-op for stores that hold none)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class HostStore(ExpertStore):
    """The experts in host RAM as numpy arrays [L, E, ...] (on GPU/TPU the copy to the device cache is a
    host-to-device transfer; on CPU a memory copy)."""

    tier = "host"

    def __init__(self, config: ModelConfig, weights: ExpertWeights):
        super().__init__(config, weights.gate.dtype)
        expected = (config.num_moe_layers, config.n_routed_experts)
        if weights.gate.shape[:2] != expected:
            raise StoreError(
                f"host store: expert stacks of shape {weights.gate.shape}; the model needs {expected} + ..."
            )
        self.weights = weights

    @classmethod
    def from_state(cls, config: ModelConfig, state: nnx.State) -> HostStore:
        """The routed-expert stacks of a model state, copied to host numpy arrays."""
        return cls(config, ExpertWeights(*(np.asarray(w) for w in expert_stacks(state))))

    def read(self, layer: int, expert: int) -> ExpertWeights:
        return ExpertWeights(*(w[layer, expert] for w in self.weights))

    def reopen(self) -> HostStore:
        """The same host arrays (read-only, never copied): a host store keeps no read state."""
        return HostStore(self.config, self.weights)


def without_routed_experts(state: nnx.State) -> nnx.State:
    """The model state with each routed-expert stack [L, E, ...] replaced by an empty [L, 0, ...] array: an
    offloaded model keeps its experts in a store, not among its parameters."""
    flat = dict(nnx.to_flat_state(state))
    for path in EXPERT_PATHS.values():
        value = flat[path].get_value()
        flat[path] = flat[path].replace(jnp.zeros((value.shape[0], 0, *value.shape[2:]), value.dtype))
    return nnx.from_flat_state(flat)
