"""Data-parallel attention with expert parallelism (`data_expert` meshes) on simulated CPU devices: the
batch and its cache split over the devices that also split the experts, and batches that do not divide
the mesh padded with dummy rows; the same logits and greedy ids as one device."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import caee_jax
from caee_jax.caee.peer_rules import PeerRule
from caee_jax.eval.decode_eval import compare
from caee_jax.model.cache import LatentCache
from caee_jax.model.execution import Execution
from caee_jax.parallel.mesh import make_mesh
from caee_jax.parallel.placement import batch_sharding, mesh_context, padded_batch, to_mesh
from caee_jax.runtime import steps

ATOL = 1e-5


def mesh_of(spec: str):
    """The mesh of `spec` over the first devices it needs."""
    size = int(np.prod([int(part.split("=")[1]) for part in spec.split(",")]))
    return make_mesh(spec, jax.devices()[:size])


@functools.partial(jax.jit, static_argnames=("graphdef", "execution"))
def prefill_and_decode(graphdef, state, tokens, next_tokens, valid, execution):
    """Full-pass logits [B, T, V] and one decode step's logits [B, V] after it, through the cache."""
    model = nnx.merge(graphdef, state)
    batch, length = tokens.shape
    out = model(tokens, execution=execution, valid=valid)
    cache = LatentCache.zeros(model.config, batch, length + 1)
    cache = jax.tree.map(lambda c, new: c.at[:, :, :length].set(new), cache, out.cache)
    positions = jnp.full((batch, 1), length, jnp.int32)
    step = model(next_tokens[:, None], positions, cache, execution=execution, valid=valid)
    return out.logits, step.logits[:, 0]


def run(model, tokens, next_tokens, execution):
    """Both logits of the real rows; a batch that does not split over the mesh padded with dummy rows."""
    batch = len(tokens)
    rows = padded_batch(model.mesh, batch)
    tokens, next_tokens = (np.concatenate([a, np.repeat(a[:1], rows - batch, axis=0)]) for a in (tokens, next_tokens))
    args = (tokens, next_tokens, np.arange(rows) < batch)
    with mesh_context(model.mesh):
        if model.mesh is not None:
            args = tuple(to_mesh(a, batch_sharding(model.mesh, a.ndim)) for a in args)
        full, step = prefill_and_decode(model.graphdef, model.state, *args, execution)
        return np.asarray(full)[:batch], np.asarray(step)[:batch]


@pytest.fixture(scope="module")
def reference():
    """Tokens of 8 sequences, and one device's logits for the first 8 and the first 3 of them."""
    model = caee_jax.init_random("tiny", seed=5)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model.config.vocab_size, (8, 7)).astype(np.int32)
    next_tokens = rng.integers(0, model.config.vocab_size, (8,)).astype(np.int32)
    want = {batch: run(model, tokens[:batch], next_tokens[:batch], Execution()) for batch in (8, 3)}
    return tokens, next_tokens, want


@pytest.mark.parametrize(
    ("spec", "batch", "dispatch", "backend"),
    [
        ("data_expert=2", 8, "auto", "loop"),
        ("data_expert=2", 3, "gather", "dense"),
        ("data_expert=4", 3, "all_to_all", "pallas"),
        ("data_expert=8", 3, "auto", "loop"),
        ("data=2,data_expert=4", 8, "all_to_all", "dense"),
        ("data=2,expert=2", 3, "auto", "loop"),
    ],
)
def test_prefill_and_decode_logits_equal_one_device(reference, spec, batch, dispatch, backend):
    """Prefill and decode through the cache, on 2, 4 and 8 devices, each exchange and backend, batches
    that do and do not divide the mesh (3 rows padded to 4 or 8); the replicated layout pads too."""
    tokens, next_tokens, want = reference
    model = caee_jax.init_random("tiny", seed=5, mesh=mesh_of(spec))
    full, step = run(model, tokens[:batch], next_tokens[:batch], Execution(backend, dispatch=dispatch))
    np.testing.assert_allclose(full, want[batch][0], atol=ATOL, rtol=0)
    np.testing.assert_allclose(step, want[batch][1], atol=ATOL, rtol=0)


def test_the_batch_and_its_cache_are_split_over_the_expert_devices():
    """On data_expert=4 each device holds 2 of the 8 sequences' latent cache after prefill, and 1/4 of the
    routed experts."""
    model = caee_jax.init_random("tiny", seed=5, mesh=mesh_of("data_expert=4"))
    put = functools.partial(lambda a: to_mesh(a, batch_sharding(model.mesh, a.ndim)))
    with mesh_context(model.mesh):
        tokens, lengths, valid = put(np.ones((8, 4), np.int32)), put(np.full(8, 4, np.int32)), put(np.ones(8, bool))
        sampling = (np.uint32(0), np.float32(0), np.float32(1))
        _, cache, _, _ = steps.prefill(
            model.graphdef, model.state, tokens, lengths, *sampling, None, valid, cache_len=8, execution=Execution()
        )
    for part in cache:  # [L, B, S, R+P]
        assert {shard.data.shape[1] for shard in part.addressable_shards} == {2}
    gate = dict(nnx.to_flat_state(model.state))[("moe_layers", "ffn", "gate_proj")].get_value()  # [L, E, D, F]
    assert {shard.data.shape[1] for shard in gate.addressable_shards} == {model.config.n_routed_experts // 4}


def test_one_prompt_generates_the_one_device_ids_and_statistics():
    """One prompt on 2 devices is padded to 2 rows: the same greedy ids and decode routing counts (the
    dummy row runs no expert and counts nowhere), with pruning on."""
    execution = Execution(pruning=PeerRule("topk", 3))
    single = caee_jax.init_random("tiny", seed=5, execution=execution)
    split = caee_jax.init_random("tiny", seed=5, mesh=mesh_of("data_expert=2"), execution=execution)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6]]
    want = caee_jax.generate_with_stats(single, prompts, max_new_tokens=6, stop=[])
    got = caee_jax.generate_with_stats(split, prompts, max_new_tokens=6, stop=[])
    assert got.tokens == want.tokens
    assert got.decode_routing == want.decode_routing
    assert got.decode_routing[1] < got.decode_routing[0]  # the rule pruned: the comparison can fail


def test_eval_pads_one_window_and_keeps_the_one_device_figures():
    """`decode_eval.compare` with one window on data_expert=2 (padded to 2 rows): the one-device nll, hits
    and kept pairs of a pruned candidate."""
    windows = np.random.default_rng(3).integers(0, 100, (1, 8)).astype(np.int32)
    candidate = Execution(pruning=PeerRule("topk", 3))
    figures = []
    for mesh in (None, mesh_of("data_expert=2")):
        model = caee_jax.init_random("tiny", seed=5, mesh=mesh)
        result = compare(model, candidate, windows, prefix=5)
        figures.append((np.concatenate(result.nll), np.concatenate(result.correct), result.kept_pairs))
    (want_nll, want_hits, want_kept), (nll, hits, kept) = figures
    np.testing.assert_allclose(nll, want_nll, atol=ATOL, rtol=0)
    assert (hits == want_hits).all() and kept == want_kept and len(nll) == 2
