"""`steps.step_jit` hashes each static argument object once, not at every call (jit would: flax's GraphDef
hashes its whole graph each time, 0.1-0.2 ms per decode step of the bundled model)."""

from __future__ import annotations

import jax.numpy as jnp

from caee_jax.runtime import steps


class CountingKey:
    """A static argument that counts how often it is hashed and traced with."""

    hashes = 0

    def __init__(self, value: float):
        self.value = value

    def __hash__(self) -> int:
        CountingKey.hashes += 1
        return hash(self.value)

    def __eq__(self, other) -> bool:
        return isinstance(other, CountingKey) and self.value == other.value


TRACES = []


@steps.step_jit(static_argnames=("key",))
def scaled(key, x):
    TRACES.append(key.value)
    return x * key.value


def test_a_static_argument_is_hashed_once_per_object_by_position_or_keyword():
    key, x = CountingKey(3.0), jnp.arange(4.0)
    CountingKey.hashes = 0
    for _ in range(5):
        assert jnp.array_equal(scaled(key, x), x * 3)
        assert jnp.array_equal(scaled(key=key, x=x), x * 3)
    assert CountingKey.hashes == 1
    assert TRACES.count(3.0) == 2  # jit keys a positional and a keyword call apart: one trace each


def test_an_equal_new_object_reuses_the_compiled_step_and_a_different_one_retraces():
    x = jnp.arange(4.0)
    scaled(CountingKey(5.0), x)
    traces = len(TRACES)
    assert jnp.array_equal(scaled(CountingKey(5.0), x), x * 5)  # equal: no new trace
    assert len(TRACES) == traces
    assert jnp.array_equal(scaled(CountingKey(7.0), x), x * 7)
    assert TRACES[-1] == 7.0


def test_lowering_takes_the_same_static_arguments():
    text = scaled.lower(CountingKey(2.0), jnp.arange(4.0)).as_text()
    assert "mul" in text
