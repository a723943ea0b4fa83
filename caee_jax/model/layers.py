"""Small building blocks: parameters with logical axes, RMSNorm, embedding, SwiGLU MLP.

Every parameter carries `logical_axes` metadata (roles such as "embed", "experts", "moe_ffw"); the
sharding rules table maps those roles to mesh axes, so no module spells a PartitionSpec.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

INIT_STD = 0.02


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], dtype, *, ones: bool = False):
    """An `nnx.Param` of `shape` (normal(0, 0.02) or ones) tagged with one logical axis name per dim.

    The `init` metadata ("normal" or "ones") lets `random_state` re-create values without tracing.
    """
    if len(shape) != len(axes):
        raise ValueError(f"shape {shape} and logical axes {axes} differ in rank")
    if ones:
        value = jnp.ones(shape, dtype)
    else:
        value = (INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=axes, init="ones" if ones else "normal")


class RMSNorm(nnx.Module):
    """x / rms(x) * weight, computed in float32 and cast back (as HF's DeepseekV3RMSNorm)."""

    def __init__(self, dim: int, eps: float, dtype, *, rngs: nnx.Rngs, axis: str = "embed"):
        self.weight = param(rngs, (dim,), (axis,), dtype, ones=True)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * xf.astype(x.dtype)


class Embed(nnx.Module):
    """Token embedding table [V, D]."""

    def __init__(self, vocab: int, dim: int, dtype, *, rngs: nnx.Rngs):
        self.embedding = param(rngs, (vocab, dim), ("vocab", "embed"), dtype)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """int [B, T] -> [B, T, D]."""
        return jnp.take(self.embedding[...], tokens, axis=0)


class MLP(nnx.Module):
    """SwiGLU feed-forward down(silu(x @ gate) * (x @ up)); weights stored [in, out]."""

    def __init__(self, dim: int, width: int, dtype, *, rngs: nnx.Rngs, width_axis: str = "ffw"):
        self.gate_proj = param(rngs, (dim, width), ("embed", width_axis), dtype)
        self.up_proj = param(rngs, (dim, width), ("embed", width_axis), dtype)
        self.down_proj = param(rngs, (width, dim), (width_axis, "embed"), dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., D] -> [..., D]."""
        gate = x @ self.gate_proj[...]
        up = x @ self.up_proj[...]
        return (jax.nn.silu(gate) * up) @ self.down_proj[...]


def random_state(abstract: nnx.Module | nnx.State, seed: int) -> nnx.State:
    """Concrete random values for an abstract module's parameters (or an abstract state), drawn with numpy.
    A variable that is already concrete keeps its value (e.g. an empty expert stack: nothing is drawn).

    Same distribution as the modules' own initialisers (normal(0, 0.02), ones for norms, zeros for
    other variables) without compiling an XLA initialiser, which takes seconds per model on CPU.
    """
    rng = np.random.default_rng(seed)

    def fill(variable: nnx.Variable) -> nnx.Variable:
        if isinstance(variable.get_value(), jax.Array):
            return variable
        init = variable.get_metadata().get("init")
        if init == "normal":
            value = INIT_STD * rng.standard_normal(variable.shape, np.float32)
        elif init == "ones":
            value = np.ones(variable.shape, np.float32)
        else:
            value = np.zeros(variable.shape, np.float32)
        return variable.replace(jnp.asarray(value, variable.dtype))

    state = abstract if isinstance(abstract, nnx.State) else nnx.state(abstract)
    return jax.tree.map(fill, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
