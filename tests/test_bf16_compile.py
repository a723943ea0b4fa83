"""The compiled bf16 decode step converts only the weights it reads: no whole bf16 weight tensor is
materialised in float32 (XLA:CPU upcasts bf16 dot operands; `runtime/steps.py` explains the option that
keeps those conversions inside each slice's read)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

import caee_jax
from caee_jax.model.cache import LatentCache
from caee_jax.runtime import steps


def materialised_f32_shapes(hlo: str) -> set[tuple[int, ...]]:
    """Shapes of the f32 arrays written to memory: instruction results outside fusion bodies (a
    conversion inside a fusion is computed element by element for the fusion's output only)."""
    shapes, in_fusion = set(), False
    for line in hlo.splitlines():
        if line and not line.startswith(" "):  # a computation header (or its closing brace)
            in_fusion = line.startswith(("%fused", "%wrapped", "fused", "wrapped"))
            continue
        match = re.match(r"\s*(?:ROOT )?%\S+ = (.*?) [a-z-]+\(", line)
        if match and not in_fusion:
            shapes |= {tuple(int(d) for d in dims.split(",")) for dims in re.findall(r"f32\[([\d,]+)\]", match[1])}
    return shapes


def decode_hlo(model, jitted) -> str:
    cache = LatentCache.zeros(model.config, 2, 16, model.dtype)
    tokens, positions = jnp.zeros(2, jnp.int32), jnp.zeros(2, jnp.int32)
    args = (model.graphdef, model.state, cache, tokens, positions, np.uint32(0), np.int32(1))
    return jitted.lower(*args, np.float32(0), np.float32(1), None, execution=model.execution).compile().as_text()


def test_the_bf16_decode_step_never_converts_a_whole_weight_tensor():
    model = caee_jax.init_random("tiny", dtype="bfloat16")
    weights = {tuple(x.shape) for x in jax.tree.leaves(model.state) if x.dtype == jnp.bfloat16 and x.size >= 1024}
    assert len(weights) > 5  # the stacks: experts, attention and dense-MLP projections, embedding
    converted = weights & materialised_f32_shapes(decode_hlo(model, steps.decode_step))
    assert not converted, f"whole bf16 weights converted to f32 on every step: {sorted(converted)}"


def test_the_check_sees_the_hoisted_conversions_of_plain_jit():
    """The same check on the step compiled with every XLA pass finds the whole-stack conversions."""
    model = caee_jax.init_random("tiny", dtype="bfloat16")
    weights = {tuple(x.shape) for x in jax.tree.leaves(model.state) if x.dtype == jnp.bfloat16 and x.size >= 1024}
    plain = jax.jit(
        steps.decode_step.__wrapped__, static_argnames=("graphdef", "execution"), donate_argnames=("cache",)
    )
    assert weights & materialised_f32_shapes(decode_hlo(model, plain))
