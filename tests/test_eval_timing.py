"""The alternated step timing of `decode_eval.compare` on several processes starts every timed step together."""

from __future__ import annotations

import jax
import numpy as np

import caee_jax
from caee_jax.caee.peer_rules import PeerRule
from caee_jax.eval import decode_eval
from caee_jax.model.execution import Execution


def test_every_timed_step_starts_after_a_barrier_on_several_processes(monkeypatch):
    """Both sides' steps are each preceded by a barrier (a step's time must not include the wait for a slower
    process's host work); one process needs none."""
    events = []
    monkeypatch.setattr(decode_eval.multihost_utils, "sync_global_devices", lambda name: events.append("barrier"))
    clock = decode_eval.time.perf_counter
    monkeypatch.setattr(decode_eval.time, "perf_counter", lambda: events.append("clock") or clock())
    model = caee_jax.init_random("tiny", seed=5)
    windows = np.random.default_rng(0).integers(0, 100, (2, 8)).astype(np.int32)
    candidate = Execution(pruning=PeerRule("topk", 3))
    result = decode_eval.compare(model, candidate, windows, prefix=5)
    assert "barrier" not in events and len(result.step_s) == 2
    events.clear()
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    decode_eval.compare(model, candidate, windows, prefix=5)
    starts = [i for i, e in enumerate(events) if e == "barrier"]
    assert len(starts) == 4  # 2 steps x 2 sides
    assert all(events[i + 1] == "clock" for i in starts)  # the clock starts right after each barrier
