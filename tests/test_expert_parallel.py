"""Expert parallelism on simulated CPU devices: the same logits and tokens on every mesh as on one device."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import compile_counter
from flax import nnx

import caee_jax
from caee_jax.experts import ExpertBackend, ExpertWeights, run_experts
from caee_jax.model.cache import LatentCache
from caee_jax.model.execution import Execution
from caee_jax.parallel.expert_parallel import run_experts_parallel
from caee_jax.parallel.mesh import MeshError, make_mesh
from caee_jax.parallel.placement import batch_sharding, mesh_context, to_mesh
from caee_jax.parallel.rules import ShardingError

ATOL = 1e-5
MESHES = ["expert=1", "expert=2", "expert=4", "expert=8", "data=2,expert=4"]


def mesh_of(spec: str):
    """The mesh of `spec` over the first devices it needs."""
    size = int(np.prod([int(part.split("=")[1]) for part in spec.split(",")]))
    return make_mesh(spec, jax.devices()[:size])


@functools.partial(jax.jit, static_argnames=("graphdef", "execution"))
def prefill_and_decode(graphdef, state, tokens, next_tokens, execution):
    """Full-pass logits [B, T, V] and the logits of one decode step [B, V] after it, through the cache."""
    model = nnx.merge(graphdef, state)
    batch, length = tokens.shape
    out = model(tokens, execution=execution)
    cache = LatentCache.zeros(model.config, batch, length + 1)
    cache = jax.tree.map(lambda c, new: c.at[:, :, :length].set(new), cache, out.cache)
    positions = jnp.full((batch, 1), length, jnp.int32)
    step = model(next_tokens[:, None], positions, cache, execution=execution)
    return out.logits, step.logits[:, 0]


def run(model, tokens, next_tokens, execution):
    with mesh_context(model.mesh):
        if model.mesh is not None:
            tokens, next_tokens = (to_mesh(a, batch_sharding(model.mesh, a.ndim)) for a in (tokens, next_tokens))
        full, step = prefill_and_decode(model.graphdef, model.state, tokens, next_tokens, execution)
        return np.asarray(full), np.asarray(step)


@pytest.fixture(scope="module")
def reference():
    model = caee_jax.init_random("tiny", seed=5)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model.config.vocab_size, (4, 11)).astype(np.int32)
    next_tokens = rng.integers(0, model.config.vocab_size, (4,)).astype(np.int32)
    return tokens, next_tokens, run(model, tokens, next_tokens, Execution())


@pytest.mark.parametrize("spec", MESHES)
def test_logits_equal_single_device(reference, spec):
    """Prefill (all_to_all dispatch) and decode (gather dispatch) on each mesh match one device."""
    tokens, next_tokens, (want_full, want_step) = reference
    model = caee_jax.init_random("tiny", seed=5, mesh=mesh_of(spec))
    full, step = run(model, tokens, next_tokens, Execution())
    np.testing.assert_allclose(full, want_full, atol=ATOL, rtol=0)
    np.testing.assert_allclose(step, want_step, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("dispatch", "backend"), [("gather", "loop"), ("all_to_all", "loop"), ("auto", "pallas"), ("auto", "dense")]
)
def test_each_dispatch_and_backend_serves_prefill_and_decode(reference, dispatch, backend):
    tokens, next_tokens, (want_full, want_step) = reference
    model = caee_jax.init_random("tiny", seed=5, mesh=mesh_of("data=2,expert=4"))
    full, step = run(model, tokens, next_tokens, Execution(backend, dispatch=dispatch))
    np.testing.assert_allclose(full, want_full, atol=ATOL, rtol=0)
    np.testing.assert_allclose(step, want_step, atol=ATOL, rtol=0)


def test_model_call_and_generation_match_on_a_mesh(reference):
    tokens = reference[0]
    single = caee_jax.init_random("tiny", seed=5)
    sharded = caee_jax.init_random("tiny", seed=5, mesh="data=2,expert=4")
    np.testing.assert_allclose(np.asarray(sharded(tokens)), np.asarray(single(tokens)), atol=ATOL, rtol=0)
    prompts = [[3, 1, 4, 1, 5], [9, 2], [6, 5, 3, 5, 8, 9, 7], [2, 3]]
    want = caee_jax.generate_with_stats(single, prompts, max_new_tokens=10, stop=[])
    got = caee_jax.generate_with_stats(sharded, prompts, max_new_tokens=10, stop=[])
    assert got.tokens == want.tokens
    assert got.dropped_pairs == 0


def test_generation_on_a_mesh_never_recompiles():
    model = caee_jax.init_random("tiny", seed=5, mesh=mesh_of("expert=4"))
    with compile_counter() as compiles:
        caee_jax.generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=4, stop=[])
        first = len(compiles)
        caee_jax.generate(model, [[9, 8, 7, 6], [3]], max_new_tokens=12, temperature=0.8, seed=2, stop=[])
    assert first >= 1
    assert len(compiles) == first


def test_capacity_overflow_is_counted_and_keeps_the_heaviest_pairs():
    """8 tokens x 2 pairs, every pair routed to shard 0's experts, 4 shards, capacity factor 1: each
    source shard has 4 pairs but 1 slot, so 12 pairs drop; the survivors are each source's heaviest."""
    rng = np.random.default_rng(1)
    n, k, e, d, f = 8, 2, 8, 16, 12
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    ids = jnp.asarray(np.stack([rng.permutation(2)[:k] for _ in range(n)]), jnp.int32)  # experts 0, 1: shard 0
    w = jnp.asarray(rng.uniform(0.1, 1.0, size=(n, k)), jnp.float32)
    keep = jnp.ones((n, k), bool)
    weights = ExpertWeights(
        *(jnp.asarray(rng.normal(size=s) * 0.3, jnp.float32) for s in [(e, d, f), (e, d, f), (e, f, d)])
    )
    mesh = make_mesh("expert=4", jax.devices()[:4])
    with jax.set_mesh(mesh):
        y, dropped = jax.jit(
            functools.partial(
                run_experts_parallel, backend=ExpertBackend.LOOP, dispatch="all_to_all", capacity_factor=1.0
            )
        )(x, ids, w, keep, weights)
    assert int(dropped) == 12
    # Source shard s holds tokens 2s, 2s+1; its one slot goes to its highest-weight pair.
    survivors = np.zeros((n, k), bool)
    flat_w = np.asarray(w)
    for s in range(4):
        rows = [2 * s, 2 * s + 1]
        block = flat_w[rows]
        r, c = np.unravel_index(np.argmax(block), block.shape)
        survivors[rows[r], c] = True
    want = run_experts(x, ids, w, jnp.asarray(survivors), weights, ExpertBackend.DENSE)
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), atol=ATOL, rtol=0)


def test_prefill_reports_dropped_pairs_when_capacity_is_too_small():
    model = caee_jax.init_random("tiny", seed=5, mesh="expert=8", execution=Execution(ep_capacity_factor=0.3))
    result = caee_jax.generate_with_stats(model, [list(range(1, 40)), list(range(50, 70))], max_new_tokens=2)
    assert result.dropped_pairs > 0


def test_experts_that_do_not_divide_the_expert_axis_are_an_error():
    with pytest.raises(ShardingError, match=r"'experts' of size 16 does not divide mesh axis 'expert' of size 3"):
        caee_jax.init_random("tiny", mesh=make_mesh("expert=3", jax.devices()[:3]))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("data=3", "needs 3 devices, have 8"),
        ("expert=4,pipeline=2", "unknown axis 'pipeline'"),
        ("expert4", "is not axis=size"),
        ("expert=4,expert=2", "given twice"),
        ("expert=2,data_expert=4", "give expert .* or data_expert .*, not both"),
    ],
)
def test_bad_mesh_specs(spec, message):
    with pytest.raises(MeshError, match=message):
        make_mesh(spec)


def test_default_mesh_puts_every_device_on_the_expert_axis():
    assert dict(make_mesh().shape) == {"data": 1, "expert": 8, "tensor": 1}


@pytest.mark.parametrize("dispatch", ["gather", "all_to_all"])
def test_loop_tile_on_a_mesh_is_the_one_device_tile(monkeypatch, dispatch):
    """Each expert shard computes its pairs in the tile of the whole batch over all experts: sizing it from
    its own share of the experts made it S times too large (64 tokens x 4 over 32 experts: 16 rows, not
    64 on 4 shards)."""
    from caee_jax.experts import loop

    tiles = []
    original = loop.loop_over_experts

    def recording(*args, **kwargs):
        tiles.append(args[-1] if len(args) == 8 else kwargs.get("tile_rows"))
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "loop_over_experts", recording)
    rng = np.random.default_rng(2)
    n, k, e, d, f = 64, 4, 32, 8, 8
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    ids = jnp.asarray(np.stack([rng.permutation(e)[:k] for _ in range(n)]), jnp.int32)
    w = jnp.asarray(rng.uniform(0.1, 1.0, size=(n, k)), jnp.float32)
    keep = jnp.ones((n, k), bool)
    weights = ExpertWeights(*(jnp.asarray(rng.normal(size=s), jnp.float32) for s in [(e, d, f), (e, d, f), (e, f, d)]))
    with jax.set_mesh(make_mesh("expert=4", jax.devices()[:4])):
        y, _ = jax.jit(functools.partial(run_experts_parallel, backend=ExpertBackend.LOOP, dispatch=dispatch))(
            x, ids, w, keep, weights
        )
    assert tiles == [ExpertBackend.LOOP.row_tile(n * k, e)] == [16]
    want = run_experts(x, ids, w, keep, weights, ExpertBackend.DENSE)
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), atol=1e-4, rtol=0)
