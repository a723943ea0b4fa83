"""host_call: no jax effect (the program keeps jax's fast dispatch path), and XLA keeps every call where the
program puts it: not speculated on a branch not taken, not hoisted out of a loop, not merged with an equal call."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from caee_jax.offload.host_call import host_call

SCALAR = (jax.ShapeDtypeStruct((), jnp.int32),)


class Recorder:
    """A host function that records its arguments and returns their sum plus one."""

    def __init__(self):
        self.calls = []

    def __call__(self, *args):
        self.calls.append(tuple(int(a) for a in args))
        return (np.int32(sum(int(a) for a in args) + 1),)


def test_a_program_with_a_host_call_has_no_jax_effect_and_a_side_effecting_custom_call():
    recorder = Recorder()

    def program(x):
        return host_call(recorder, SCALAR, x)[0]

    assert jax.make_jaxpr(program)(jnp.int32(1)).effects == set()
    hlo = jax.jit(program).lower(jnp.int32(1)).as_text()
    assert "custom_call" in hlo and "has_side_effect = true" in hlo
    assert int(jax.jit(program)(jnp.int32(4))) == 5 and recorder.calls == [(4,)]


def test_a_call_on_a_branch_not_taken_never_runs():
    recorder = Recorder()

    @jax.jit
    def program(predicate, x):
        return jax.lax.cond(predicate, lambda v: host_call(recorder, SCALAR, v)[0], lambda v: v, x)

    assert int(program(False, jnp.int32(3))) == 3 and recorder.calls == []
    assert int(program(True, jnp.int32(3))) == 4 and recorder.calls == [(3,)]


def test_a_call_with_loop_invariant_arguments_runs_every_iteration_in_order():
    recorder = Recorder()

    @jax.jit
    def program(x):
        def body(i, total):  # the call's argument does not change from iteration to iteration
            return total * 10 + host_call(recorder, SCALAR, x)[0] + 0 * i

        return jax.lax.fori_loop(0, 3, body, jnp.int32(0))

    assert int(program(jnp.int32(1))) == 222 and recorder.calls == [(1,)] * 3


def test_equal_calls_are_not_merged_and_run_in_data_order():
    recorder = Recorder()
    call = functools.partial(host_call, recorder, SCALAR)

    @jax.jit
    def program(x):
        first, second = call(x)[0], call(x)[0]  # equal calls, both kept
        return call(first + second)[0]  # after both: it needs their results

    assert int(program(jnp.int32(2))) == 7 and recorder.calls == [(2,), (2,), (6,)]


def test_outside_jit_it_calls_the_function_directly():
    recorder = Recorder()
    (result,) = host_call(recorder, SCALAR, jnp.int32(5))
    assert result.dtype == jnp.int32 and int(result) == 6 and recorder.calls == [(5,)]
