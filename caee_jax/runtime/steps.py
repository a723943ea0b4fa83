"""Every jitted call of the model, in one place: split once, merge inside jit, call, reduce.

Each function takes the static graph definition and the plan (`Execution`) as static arguments and the
state of arrays as an argument (parameters are never constants in compiled code). Outputs that every
process reads are replicated over the mesh (`gather_replicated`). `expert_cache` is the device expert
cache of a model whose experts are offloaded (`offload/`), None otherwise: donated and returned updated.
Letters: B batch, T tokens, V vocab, L MoE layers, S devices (expert shards), K top-k, E experts, D hidden.
`valid` [B] bool marks the real rows of a batch padded to split over the mesh (None: every row): dummy
rows run attention but no expert and count in no statistic (`DeepseekV3.__call__`).

On CPU the steps compile without XLA's while-loop-invariant code motion (`step_jit`). XLA:CPU has no
bf16 dot, so it converts a bf16 weight operand to f32; the weight stacks [L, ...] are loop-invariant
in the layer scan and the expert loop, so that pass hoisted the conversion of every whole stack out of
the loops: each bf16 decode step converted all weights, active experts or not (bundled model, batch 1:
~40 ms against ~2.5 ms in f32). Without it the conversion fuses into each read of the one slice in use
(`docs/RESULTS.md`; `tests/test_bf16_compile.py` checks the optimised HLO).
"""

from __future__ import annotations

import collections
import functools
import inspect

import jax
import jax.numpy as jnp
from flax import nnx

from caee_jax.caee.cost_model import predict
from caee_jax.caee.cost_table import CostTable
from caee_jax.model.cache import LatentCache
from caee_jax.model.execution import Execution
from caee_jax.model.moe import routing_counts
from caee_jax.parallel.placement import gather_replicated
from caee_jax.routing.ops import expert_load
from caee_jax.runtime.sampling import sample

CPU_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


class _Hashed:
    """A static argument whose hash is computed once per object: jit hashes its static arguments at every
    call, and flax's `GraphDef` hashes its whole graph each time (0.1-0.2 ms for the bundled model, a tenth
    of a batch-1 decode step). Equal when the values are (the same object first, the cheap case)."""

    __slots__ = ("value", "hash")

    def __init__(self, value):
        self.value, self.hash = value, hash(value)

    def __hash__(self) -> int:
        return self.hash

    def __eq__(self, other) -> bool:
        return isinstance(other, _Hashed) and (self.value is other.value or self.value == other.value)


_HASHED: collections.OrderedDict[int, _Hashed] = collections.OrderedDict()  # by id(value), newest last
_HASHED_LIMIT = 64


def _hashed(value) -> _Hashed:
    """`value` wrapped, from a bounded memo keyed by identity (the wrapper holds the value, so an id in the
    memo is never reused by another object)."""
    entry = _HASHED.get(id(value))
    if entry is None or entry.value is not value:
        entry = _HASHED[id(value)] = _Hashed(value)
        if len(_HASHED) > _HASHED_LIMIT:
            _HASHED.popitem(last=False)
    return entry


def step_jit(**jit_kwargs):
    """`jax.jit(fn, **jit_kwargs)`, compiled with CPU_COMPILER_OPTIONS when the default backend is CPU
    (chosen at call time: importing this module must not start JAX before `jax.distributed.initialize`).
    Static arguments, passed by keyword or position, are hashed once per object (`_Hashed`)."""

    def decorate(fn):
        static = set(jit_kwargs.get("static_argnames", ()))
        static_positions = {i for i, name in enumerate(inspect.signature(fn).parameters) if name in static}

        @functools.wraps(fn)
        def unwrapped(*args, **kwargs):
            args = [a.value if isinstance(a, _Hashed) else a for a in args]
            return fn(*args, **{k: v.value if isinstance(v, _Hashed) else v for k, v in kwargs.items()})

        plain = jax.jit(unwrapped, **jit_kwargs)
        cpu = jax.jit(unwrapped, compiler_options=CPU_COMPILER_OPTIONS, **jit_kwargs)

        def choose():
            return cpu if jax.default_backend() == "cpu" else plain

        def hashing(method):
            """`method` of the chosen jit, called with the static arguments in `_Hashed` holders."""

            def run(*args, **kwargs):
                args = [_hashed(a) if i in static_positions else a for i, a in enumerate(args)]
                kwargs = {k: _hashed(v) if k in static else v for k, v in kwargs.items()}
                return getattr(choose(), method)(*args, **kwargs)

            return run

        call = functools.wraps(fn)(hashing("__call__"))
        call.lower, call.trace = hashing("lower"), hashing("trace")
        return call

    return decorate


def sampling_key(seed, step):
    """The sampling key of a step, derived inside jit (no host key array to place on a mesh)."""
    return jax.random.fold_in(jax.random.key(seed), step)


@step_jit(static_argnames=("graphdef", "execution"), donate_argnames=("expert_cache",))
def logits(graphdef, state, tokens, expert_cache=None, valid=None, *, execution: Execution):
    """tokens [B, T] -> (full-sequence logits [B, T, V] f32, expert_cache)."""
    out = nnx.merge(graphdef, state)(tokens, execution=execution, expert_cache=expert_cache, valid=valid)
    return out.logits, out.expert_cache


@step_jit(static_argnames=("graphdef", "cache_len", "execution"), donate_argnames=("expert_cache",))
def prefill(
    graphdef,
    state,
    tokens,
    lengths,
    seed,
    temperature,
    top_p,
    expert_cache=None,
    valid=None,
    *,
    cache_len: int,
    execution,
):
    """tokens [B, T] (right-padded), lengths [B] -> (first sampled ids [B], LatentCache with S = cache_len,
    expert-parallel dropped pairs summed over MoE layers, expert_cache)."""
    model = nnx.merge(graphdef, state)
    out = model(tokens, execution=execution, expert_cache=expert_cache, valid=valid)
    batch, length = tokens.shape
    cache = LatentCache.zeros(model.config, batch, cache_len, out.cache.moe.dtype)
    cache = jax.tree.map(lambda c, new: c.at[:, :, :length].set(new), cache, out.cache)
    last = out.logits[jnp.arange(batch), lengths - 1]  # [B, V]
    ids = sample(last, sampling_key(seed, 0), temperature, top_p)
    dropped = jnp.sum(out.routing.dropped_pairs) if out.routing is not None else jnp.zeros((), jnp.int32)
    return gather_replicated(ids), cache, dropped, out.expert_cache


def _decode(graphdef, state, cache, tokens, positions, execution: Execution, expert_cache=None, valid=None):
    """One decode step of the model: tokens [B] at positions [B] -> (model, ModelOutput)."""
    model = nnx.merge(graphdef, state)
    out = model(tokens[:, None], positions[:, None], cache, execution=execution, expert_cache=expert_cache, valid=valid)
    return model, out


def _counts(model, out, execution: Execution, valid=None) -> jax.Array:
    """Routing counts [4] int32 of a step's real rows (`routing_counts`), zeros for a model without MoE
    layers."""
    if out.routing is None:
        return jnp.zeros(4, jnp.int32)
    return routing_counts(out.routing, model.config.n_routed_experts, execution.pruning is not None, valid)


@step_jit(static_argnames=("graphdef", "execution"), donate_argnames=("cache", "expert_cache"))
def decode_step(
    graphdef,
    state,
    cache,
    tokens,
    positions,
    seed,
    step,
    temperature,
    top_p,
    expert_cache=None,
    valid=None,
    *,
    execution,
):
    """tokens [B] at positions [B] -> (next ids [B], updated cache, routing counts [4] int32: routed pairs,
    kept pairs, active experts before and after pruning, each summed over the MoE layers, expert_cache);
    step numbers the sampling key."""
    model, out = _decode(graphdef, state, cache, tokens, positions, execution, expert_cache, valid)
    ids = sample(out.logits[:, 0], sampling_key(seed, step), temperature, top_p)
    counts = gather_replicated(_counts(model, out, execution, valid))
    return gather_replicated(ids), out.cache, counts, out.expert_cache


@step_jit(static_argnames=("graphdef", "execution", "table"), donate_argnames=("cache", "expert_cache"))
def teacher_forced_step(
    graphdef,
    state,
    cache,
    tokens,
    positions,
    expert_cache=None,
    valid=None,
    *,
    execution: Execution,
    table: CostTable | None,
):
    """tokens [B] at positions [B] -> (log-probabilities [B, V], cache, routing counts [4] (`routing_counts`),
    predicted MoE time per layer and device [2, L, S]: unpruned, as run (s; 0 without table; offloaded, a
    non-resident expert adds its tier's fetch time; with EPLB replicas, by slot on the slots' devices),
    expert_cache)."""
    model, out = _decode(graphdef, state, cache, tokens, positions, execution, expert_cache, valid)
    logprobs = jax.nn.log_softmax(out.logits[:, 0], axis=-1)
    routing = out.routing
    predicted = jnp.zeros((2, 1, 1))
    if table is not None:
        ids = routing.topk_ids if routing.slot_ids is None else routing.slot_ids
        if routing.slot_ids is not None:
            table = table.over_slots(model.moe_layers.ffn.num_slots)
        device_s = jax.vmap(lambda ids, keep, tiers: predict(table, ids[:, 0], keep[:, 0], tiers).device_s)
        shape = routing.keep_mask.shape  # [L, B, 1, K]
        everything = jnp.ones(shape, bool) if valid is None else jnp.broadcast_to(valid[None, :, None, None], shape)
        predicted = jnp.stack([device_s(ids, keep, routing.residency) for keep in (everything, routing.keep_mask)])
    replicated = [gather_replicated(a) for a in (logprobs, _counts(model, out, execution, valid), predicted)]
    return replicated[0], out.cache, *replicated[1:], out.expert_cache


@step_jit(static_argnames=("graphdef", "execution"))
def score_windows(graphdef, state, windows, *, execution: Execution):
    """windows [B, T + 1] -> (nll [B, T], correct [B, T], topk_ids [L, B, T, K], topk_weights [L, B, T, K]):
    each token after a window's first predicted from the ones before it."""
    out = nnx.merge(graphdef, state)(windows[:, :-1], execution=execution)
    logprobs = jax.nn.log_softmax(out.logits, axis=-1)
    targets = windows[:, 1:]
    nll = -jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    correct = jnp.argmax(out.logits, axis=-1) == targets
    return nll, correct, out.routing.topk_ids, out.routing.topk_weights


@step_jit(static_argnames=("graphdef", "execution"))
def expert_sums(graphdef, state, tokens, *, execution: Execution):
    """tokens [B, T] -> (expert output sums [L, E, D] f32, routed pairs per expert [L, E] int32)."""
    model = nnx.merge(graphdef, state)
    routing = model(tokens, execution=execution, collect_expert_sums=True).routing
    everything = jnp.ones_like(routing.keep_mask)
    counts = jax.vmap(lambda ids: expert_load(ids, everything[0], model.config.n_routed_experts).pairs)
    return gather_replicated(routing.expert_sums), gather_replicated(counts(routing.topk_ids))


@step_jit(static_argnames=("graphdef", "execution"))
def routing(graphdef, state, tokens, *, execution: Execution):
    """tokens [B, T] -> (topk_ids int32, topk_weights f32, keep_mask bool), each [L, B, T, K]: every MoE
    layer's routing and the pairs that ran."""
    out = nnx.merge(graphdef, state)(tokens, execution=execution).routing
    return tuple(gather_replicated(a) for a in (out.topk_ids, out.topk_weights, out.keep_mask))


@step_jit(static_argnames=("graphdef", "execution", "probes"))
def importance_stats(graphdef, state, tokens, *, execution: Execution, probes: tuple[Execution, ...]):
    """tokens [B, T] -> the sums behind CAEE's importance calibration (`calibration/importance.py`):
    (squared expert output norms summed per expert [L, E] f32, routed pairs per expert [L, E] int32,
    per probe: KL(unpruned || probe) of the next-token distributions summed over the B*T tokens [P] f32,
    the pruned share of the gate mass summed over tokens and MoE layers [P] f32, and the correct top-1
    predictions lost, those of the B*(T-1) tokens with a next token in `tokens` that the unpruned model
    predicts and the probe does not [P] int32). `execution` is the unpruned plan; each probe a pruned one."""
    model = nnx.merge(graphdef, state)
    out = model(tokens, execution=execution, collect_expert_sums=True)
    everything = jnp.ones_like(out.routing.keep_mask)
    counts = jax.vmap(lambda ids: expert_load(ids, everything[0], model.config.n_routed_experts).pairs)
    base = jax.nn.log_softmax(out.logits, axis=-1)
    truth = tokens[:, 1:]
    correct = jnp.argmax(out.logits[:, :-1], -1) == truth
    kls, shares, lost_correct = [], [], []
    for probe in probes:
        pruned = model(tokens, execution=probe)
        logprobs = jax.nn.log_softmax(pruned.logits, axis=-1)
        kls.append(jnp.sum(jnp.exp(base) * (base - logprobs)))
        weights, keep = pruned.routing.topk_weights, pruned.routing.keep_mask  # [L, B, T, K]
        lost = jnp.sum(jnp.where(keep, 0.0, weights), -1) / jnp.maximum(jnp.sum(weights, -1), 1e-30)
        shares.append(jnp.sum(lost))
        lost_correct.append(jnp.sum(correct & (jnp.argmax(pruned.logits[:, :-1], -1) != truth)))
    sums = (
        out.routing.expert_sq_norms, counts(out.routing.topk_ids), jnp.stack(kls), jnp.stack(shares),
        jnp.stack(lost_correct),
    )  # fmt: skip
    return tuple(gather_replicated(a) for a in sums)
