"""`benchmarks/eviction_bound.py`'s replay of the expert cache on a routing trace: it must count what the real
cache counts (its bound on prefetch + eviction rests on that), and Belady's rule never reads more."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

import caee_jax
from caee_jax.offload.cache import Offload

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from eviction_bound import POLICIES, replay, routing_trace  # noqa: E402

PROMPTS = [[5, 17, 3, 99, 42, 7, 11], [64, 2, 2, 130, 8]]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def model_and_trace():
    model = caee_jax.init_random("tiny")
    generated = caee_jax.generate(model, PROMPTS, max_new_tokens=NEW_TOKENS, stop=())
    return model, generated, routing_trace(model, PROMPTS, generated)


@pytest.mark.parametrize("slots", [2, 5])
@pytest.mark.parametrize("policy", ["lru", "lfu", "cost"])
def test_the_replay_counts_the_real_caches_misses_and_reads_step_by_step(model_and_trace, policy, slots):
    """Prefill and every decode step, summed over MoE layers: misses and fetches of an offloaded run (host
    store, prefetch off) equal the replay's."""
    model, generated, trace = model_and_trace
    offloaded = caee_jax.Model(
        model.module, None, "loop", None, Offload("host", experts=slots, policy=policy, prefetch=False)
    )
    run = caee_jax.generate_with_stats(offloaded, PROMPTS, max_new_tokens=NEW_TOKENS, stop=())
    assert run.tokens == generated
    layers = len(trace[0])
    assert len(trace) == 1 + len(run.decode_offload)
    replayed = [replay([step[layer] for step in trace], slots, model.config, policy) for layer in range(layers)]
    misses = sum(m for m, _ in replayed)
    reads = sum(r for _, r in replayed)
    real = [run.prefill_offload, *run.decode_offload]
    np.testing.assert_array_equal(misses, [s.misses for s in real])
    np.testing.assert_array_equal(reads, [s.fetches for s in real])


def test_belady_reads_no_more_than_any_policy(model_and_trace):
    model, _, trace = model_and_trace
    for slots in (1, 2, 5):
        for layer in range(len(trace[0])):
            needs = [step[layer] for step in trace]
            reads = {p: replay(needs, slots, model.config, p)[1].sum() for p in POLICIES}
            assert reads["belady"] <= min(reads.values())
            assert reads["belady"] >= len(np.unique(np.concatenate(needs)))  # every expert is read once at least
