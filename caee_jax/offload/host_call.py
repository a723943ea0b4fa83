"""`host_call`: a call from a jitted program into Python on the host, for the offloaded layers' cache manager,
which reads the expert store and changes host state (`CacheManager.announce`, `CacheManager.fetch`).

jax's own callbacks force a choice here. `io_callback` gives the program a jax effect, and jax dispatches every
call of an effectful program on its Python path instead of the C++ one: ~2 ms per decode step on this machine,
whether or not a callback runs in that step. `pure_callback` keeps the fast path but tells XLA the call has no
side effect, so XLA may drop, merge, hoist or speculate it. `host_call` has neither problem: jax sees no effect,
and XLA sees a side-effecting custom call, which it never removes, merges, moves out of a loop or runs on a
`lax.cond` branch not taken.

Without a jax effect nothing orders two calls but the data: each call must take, through its arguments, what the
previous call's results changed. The offload path's calls do: a layer's calls read the device cache state that
the earlier calls' results wrote, and the next layer's routing depends on this layer's output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import mlir

host_call_p = Primitive("caee_host_call")
host_call_p.multiple_results = True


def host_call(function: Callable, result_shapes: Sequence[jax.ShapeDtypeStruct], *args: jax.Array) -> list:
    """function(*args as numpy arrays) -> arrays of `result_shapes` (shape and dtype each), called once each
    time the program reaches the call. `function` is a parameter of the primitive, so hashable. A call whose
    results are all unused may be dropped by jax (it sees no effect): the offload path uses every call's."""
    avals = tuple(jax.core.ShapedArray(s.shape, s.dtype) for s in result_shapes)
    return host_call_p.bind(*args, function=function, result_avals=avals)


def _host_side(function: Callable) -> Callable:
    def call(*arrays):  # the arguments are views of the program's buffers, valid only during the call
        return function(*(np.array(a) for a in arrays))

    return call


@host_call_p.def_abstract_eval
def _abstract_eval(*avals, function, result_avals):
    return result_avals


@host_call_p.def_impl
def _eager(*args, function, result_avals):
    results = function(*(np.asarray(a) for a in args))
    return [jnp.asarray(r, a.dtype) for r, a in zip(results, result_avals, strict=True)]


def _lowering(ctx, *args, function, result_avals):
    results, _, _ = mlir.emit_python_callback(
        ctx,
        _host_side(function),
        None,
        list(args),
        ctx.avals_in,
        ctx.avals_out,
        has_side_effect=True,
        returns_token=False,
    )
    return results


mlir.register_lowering(host_call_p, _lowering, cacheable=False)
