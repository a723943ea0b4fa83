"""Expert backends: `loop` against `dense` against a plain numpy SwiGLU reference, tiling, and no recompiles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from caee_jax.experts import ExpertBackend, ExpertWeights, run_experts
from caee_jax.experts.loop import run_loop
from caee_jax.routing.backend import default_tile_rows

# (tokens N, hidden D, expert width F, experts E, top-k K): odd sizes, a single token, K=1, E not a power of
# two, and N*K >> E so an expert spans several default-size row tiles.
SHAPES = [
    (1, 8, 4, 3, 1),
    (1, 16, 8, 6, 2),
    (7, 13, 5, 5, 3),
    (33, 24, 10, 12, 4),
    (64, 16, 6, 7, 2),
    (200, 8, 3, 3, 2),
]
SHAPE_IDS = [f"N{n}-D{d}-F{f}-E{e}-K{k}" for n, d, f, e, k in SHAPES]


def make_weights(d, f, e, seed=0, dtype=jnp.float32) -> ExpertWeights:
    rng = np.random.default_rng(seed)
    return ExpertWeights(
        gate=jnp.asarray(rng.standard_normal((e, d, f)) / np.sqrt(d), dtype),
        up=jnp.asarray(rng.standard_normal((e, d, f)) / np.sqrt(d), dtype),
        down=jnp.asarray(rng.standard_normal((e, f, d)) / np.sqrt(f), dtype),
    )


def make_routing(n, e, k, seed=0, keep_prob=0.7):
    """ids [N, K] (distinct per token, as the router gives), positive weights, a random keep mask that keeps
    pair (0, 0), so no case is trivially all-zero."""
    rng = np.random.default_rng(seed)
    ids = np.argsort(rng.random((n, e)), axis=-1)[:, :k].astype(np.int32)
    weights = rng.uniform(0.1, 1.0, (n, k)).astype(np.float32)
    keep = rng.random((n, k)) < keep_prob
    keep[0, 0] = True
    return ids, weights, keep


def make_x(n, d, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)


def numpy_experts(x, ids, weights, keep, w: ExpertWeights) -> np.ndarray:
    """y[n] = sum_k keep * weight * down_e(silu(x @ gate_e) * (x @ up_e)), one (token, slot) at a time, float64."""
    x = x.astype(np.float64)
    gate, up, down = (np.asarray(a, np.float64) for a in w)
    y = np.zeros_like(x)
    for n, k in np.ndindex(ids.shape):
        if keep[n, k]:
            e = ids[n, k]
            g, u = x[n] @ gate[e], x[n] @ up[e]
            y[n] += weights[n, k] * ((g / (1 + np.exp(-g)) * u) @ down[e])
    return y


# One compilation per shape and backend (eager dispatch would compile every op separately: much slower).
run_experts_jit = jax.jit(run_experts, static_argnames="backend")


def run(backend, x, ids, weights, keep, w) -> np.ndarray:
    return np.asarray(run_experts_jit(x, ids, weights, keep, w, backend=backend))


def assert_close(actual, desired, rel=1e-5):
    """fp32: atol 1e-5 relative to the output scale (summation order differs between backends)."""
    scale = max(float(np.abs(desired).max()), 1e-30)
    np.testing.assert_allclose(actual, desired, rtol=0, atol=rel * scale)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_dense_matches_numpy_reference(shape):
    n, d, f, e, k = shape
    x, (ids, weights, keep), w = make_x(n, d), make_routing(n, e, k), make_weights(d, f, e)
    reference = numpy_experts(x, ids, weights, keep, w)
    assert np.abs(reference).max() > 0
    assert_close(run(ExpertBackend.DENSE, x, ids, weights, keep, w), reference)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_loop_matches_dense(shape):
    n, d, f, e, k = shape
    x, (ids, weights, keep), w = make_x(n, d, 1), make_routing(n, e, k, 1), make_weights(d, f, e, 1)
    dense = run(ExpertBackend.DENSE, x, ids, weights, keep, w)
    assert_close(run(ExpertBackend.LOOP, x, ids, weights, keep, w), dense)


@pytest.mark.parametrize("backend", [ExpertBackend.LOOP, ExpertBackend.DENSE], ids=["loop", "dense"])
def test_all_pairs_pruned_gives_exact_zero(backend):
    n, d, f, e, k = 9, 12, 5, 6, 2
    ids, weights, _ = make_routing(n, e, k)
    out = run(backend, make_x(n, d), ids, weights, np.zeros((n, k), bool), make_weights(d, f, e))
    assert out.shape == (n, d) and (out == 0).all()


def test_loop_never_reads_unused_or_fully_pruned_experts():
    """Expert 2 is routed but every pair to it pruned, the last expert never routed: both get NaN weights,
    which `loop` must never touch (dense multiplies them by a zero weight, so it gets NaN: compare to clean).
    Inactive experts sit between active ones, so the active-expert list really has gaps to skip."""
    n, d, f, e, k = 20, 10, 4, 7, 3
    x, (ids, weights, keep), w = make_x(n, d), make_routing(n, e - 1, k), make_weights(d, f, e)
    keep[ids == 2] = False
    assert (ids == 2).any() and (keep & (ids == 0)).any() and (keep & (ids == 3)).any()
    poisoned = ExpertWeights(*(a.at[jnp.array([2, e - 1])].set(jnp.nan) for a in w))
    loop = run(ExpertBackend.LOOP, x, ids, weights, keep, poisoned)
    assert np.isfinite(loop).all()
    assert_close(loop, run(ExpertBackend.DENSE, x, ids, weights, keep, w))
    assert_close(loop, numpy_experts(x, ids, weights, keep, w))


@pytest.mark.parametrize("k", [1, 3])
def test_duplicate_heavy_routing(k):
    """Every token sends slot 0 to expert 2: one expert holds N pairs, spanning many row tiles."""
    n, d, f, e = 150, 8, 5, 5
    x, (ids, weights, keep), w = make_x(n, d), make_routing(n, e, k), make_weights(d, f, e)
    holds_2 = ids == 2
    ids[holds_2] = np.repeat(ids[:, :1], k, 1)[holds_2]  # swap, keeping ids distinct per token
    ids[:, 0] = 2
    assert all(len(set(row)) == k for row in ids)
    dense = run(ExpertBackend.DENSE, x, ids, weights, keep, w)
    assert_close(dense, numpy_experts(x, ids, weights, keep, w))
    assert_close(run(ExpertBackend.LOOP, x, ids, weights, keep, w), dense)


def test_bf16_loop_matches_dense():
    """bf16 weights and activations. Both backends round the same intermediates to bf16 (gate/up products,
    the SwiGLU hidden, the down projection, the output), but XLA fuses and accumulates them differently, so
    they can sit several bf16 roundings (2^-9 relative each) apart; measured ~2^-8 of the output scale.
    2^-6 of the output scale leaves margin for that, while a wrong expert, weight or token moves outputs by
    O(scale)."""
    n, d, f, e, k = 33, 24, 10, 12, 4
    bf16 = jnp.bfloat16
    x, (ids, weights, keep) = make_x(n, d).astype(bf16), make_routing(n, e, k)
    w = make_weights(d, f, e, dtype=bf16)
    dense, loop = (run(b, x, ids, weights, keep, w) for b in (ExpertBackend.DENSE, ExpertBackend.LOOP))
    assert dense.dtype == loop.dtype == bf16
    assert_close(loop.astype(np.float32), dense.astype(np.float32), rel=2**-6)


def test_tile_rows_do_not_change_results():
    n, d, f, e, k = 64, 12, 6, 5, 3
    x, (ids, weights, keep), w = make_x(n, d), make_routing(n, e, k), make_weights(d, f, e)
    loop = jax.jit(run_loop, static_argnames="tile_rows")
    default = np.asarray(loop(x, ids, weights, keep, w))
    assert_close(default, numpy_experts(x, ids, weights, keep, w))
    for tile_rows in (1, 3, 8, 128):
        assert_close(np.asarray(loop(x, ids, weights, keep, w, tile_rows=tile_rows)), default)


@pytest.mark.parametrize(
    "pairs, experts, expected", [(1, 256, 8), (64, 16, 8), (256, 16, 32), (300, 16, 64), (4096, 8, 128)]
)
def test_default_tile_rows(pairs, experts, expected):
    """About twice the mean pairs per expert, rounded up to a power of two, clamped to [8, 128]."""
    assert default_tile_rows(pairs, experts) == expected


def test_loop_does_not_recompile_for_new_routing():
    """Trip counts are data: new ids, keep masks and even zero active experts reuse one executable."""
    n, d, f, e, k = 24, 8, 4, 6, 2
    x, w = make_x(n, d), make_weights(d, f, e)
    routings = [make_routing(n, e, k, seed) for seed in range(3)]
    routings.append((np.tile(np.int32([3, 4]), (n, 1)), routings[0][1], np.ones((n, k), bool)))  # 2 active experts
    routings.append((routings[0][0], routings[0][1], np.zeros((n, k), bool)))
    compiles = []

    def listener(event, duration, **kwargs):
        if "compile" in event:
            compiles.append(event)

    jitted = jax.jit(lambda *args: run_experts(*args, backend=ExpertBackend.LOOP))
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        outputs = []
        for i, (ids, weights, keep) in enumerate(routings):
            outputs.append(np.asarray(jitted(x, ids, weights, keep, w)))
            if i == 0:
                assert compiles, "the listener saw no compilation at all: it would not see a recompile either"
                compiles.clear()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    assert jitted._cache_size() == 1
    for out, (ids, weights, keep) in zip(outputs, routings, strict=True):  # the reused executable obeys new data
        assert_close(out, numpy_experts(x, ids, weights, keep, w))
