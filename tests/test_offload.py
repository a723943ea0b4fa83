"""Offloaded experts: bit-exactness against the all-resident model, what is (never) loaded, CAEE's price of
a miss, refused budgets and setups, and the launcher's flags and report."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_caee_policy import table

import caee_jax
from caee_jax.caee.policy import CAEEConfig, caee_prune
from caee_jax.caee.rule_config import parse_rule
from caee_jax.model.execution import Execution
from caee_jax.offload import options
from caee_jax.offload.cache import CacheManager, Offload, slots_for
from caee_jax.offload.disk_store import write_disk_store
from caee_jax.offload.execute import run_offloaded
from caee_jax.offload.store import HostStore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [[5, 17, 3, 99, 42, 7, 11], [64, 2, 2, 130, 8]]
TOKENS = np.array([[5, 17, 3, 99, 42, 7, 11, 1], [64, 2, 2, 130, 8, 9, 1, 0]])


@pytest.fixture(scope="module")
def resident():
    """(logits [2, 8, V], greedy ids) of the all-resident tiny model."""
    model = caee_jax.init_random("tiny")
    return np.asarray(model(TOKENS)), caee_jax.generate(model, PROMPTS, max_new_tokens=6)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    model = caee_jax.init_random("tiny")
    directory = str(tmp_path_factory.mktemp("offload") / "store")
    write_disk_store(directory, model.config, model.state, source="tiny")
    return directory


def offloaded(offload: Offload, execution="loop") -> caee_jax.Model:
    """The resident tiny model's weights with the experts offloaded (`init_random` with a disk store would
    not draw the experts, and so would draw the other weights differently)."""
    return caee_jax.Model(caee_jax.init_random("tiny").module, None, execution, None, offload)


@pytest.mark.parametrize(
    ("store", "slots", "policy"),
    [("host", 1, "lru"), ("host", 3, "lfu"), ("disk", 2, "cost")],
)
def test_offloaded_logits_and_ids_equal_the_resident_model_bit_for_bit(resident, store_dir, store, slots, policy):
    """With pruning off, every cache size (1 slot: smaller than one token's top-4) gives the same bits."""
    directory = store_dir if store == "disk" else None
    model = offloaded(Offload(store, directory, experts=slots, policy=policy))
    logits, ids = resident
    np.testing.assert_array_equal(np.asarray(model(TOKENS)), logits)
    assert caee_jax.generate(model, PROMPTS, max_new_tokens=6) == ids
    manager = model.execution.offload
    assert manager.slots == slots
    assert np.all((manager.slot_of >= 0).sum(axis=1) <= slots)  # never more residents than slots


def test_statistics_add_up_and_a_warm_cache_hits(resident):
    model = offloaded(Offload("host", experts=16))  # every expert fits: only cold misses
    result = caee_jax.generate_with_stats(model, PROMPTS, max_new_tokens=6)
    assert result.tokens == resident[1]
    prefill, steps = result.prefill_offload, result.decode_offload
    assert len(steps) == len(result.decode_step_s)
    for stats in [prefill, *steps]:
        assert stats.fetches == stats.misses == stats.blocking_fetches + stats.prefetched_fetches
        assert stats.bytes_read == stats.fetches * model.execution.offload.store.expert_bytes
        assert stats.pruned_misses == 0
    assert prefill.misses > 0 and prefill.hits + prefill.misses > 0
    assert steps[-1].misses == 0 or steps[-1].hit_rate > 0.5  # decode mostly re-uses what prefill loaded


class CountingStore:
    """Wraps a store and records every (layer, expert) read from it."""

    def __init__(self, store):
        self.store, self.reads = store, []

    def __getattr__(self, name):
        return getattr(self.store, name)

    def read(self, layer, expert):
        self.reads.append((layer, expert))
        return self.store.read(layer, expert)

    def read_many(self, layer, experts):
        self.reads.extend((layer, expert) for expert in experts)
        return self.store.read_many(layer, experts)


@pytest.mark.parametrize("rule", ["top_p=0.6", "caee=1.5"])
def test_pruned_misses_are_never_read(rule):
    """A miss the rule prunes is never loaded: reads = fetches = kept misses, and some misses were pruned."""
    rule = parse_rule(rule)
    cost_table = table(16, 1, 4, backend="loop") if isinstance(rule, CAEEConfig) else None
    execution = Execution("loop", pruning=rule, cost_table=cost_table)
    model = caee_jax.init_random("tiny", execution=execution, offload=Offload("host", experts=2))
    manager = model.execution.offload
    manager.store = store = CountingStore(manager.store)
    result = caee_jax.generate_with_stats(model, PROMPTS[:1], max_new_tokens=6)
    stats = [result.prefill_offload, *result.decode_offload]
    assert sum(s.pruned_misses for s in stats) > 0, "the rule pruned no miss: the test would check nothing"
    assert len(store.reads) == sum(s.fetches for s in stats) == sum(s.misses for s in stats)


def test_caee_prunes_a_miss_before_an_equally_important_resident_expert():
    """Two experts of equal importance and cost, one resident and one on disk: the miss goes first."""
    ids = jnp.array([[0, 1, 2, 3]], jnp.int32)
    weights = jnp.array([[0.4, 0.3, 0.15, 0.15]], jnp.float32)
    costs = table(16, 1, 4)
    residency = jnp.zeros(16, jnp.int32).at[3].set(2)  # expert 3 on disk, the rest on device
    rule = CAEEConfig(theta=0.5, refill=False)
    keep = np.asarray(caee_prune(costs, rule, ids, weights, residency).keep_mask)[0]
    assert keep.tolist() == [True, True, True, False]
    residency = jnp.zeros(16, jnp.int32).at[2].set(2)  # now expert 2 is the miss
    keep = np.asarray(caee_prune(costs, rule, ids, weights, residency).keep_mask)[0]
    assert keep.tolist() == [True, True, False, True]
    all_resident = np.asarray(caee_prune(costs, rule, ids, weights).keep_mask)[0]
    assert all_resident.all()  # at theta 0.5 nothing resident is worth pruning


def test_a_cache_budget_that_holds_nothing_is_refused_with_the_minimum():
    store = HostStore.from_state(*_config_and_state())
    with pytest.raises(ValueError, match=r"holds nothing; the minimum is \d+ bytes \(one expert per MoE layer\)"):
        slots_for(store, nbytes=store.expert_bytes)
    with pytest.raises(ValueError, match="holds nothing"):
        slots_for(store, fraction=0.01)
    with pytest.raises(ValueError, match="exactly one cache budget"):
        slots_for(store, experts=2, fraction=0.5)
    assert slots_for(store, nbytes=2 * store.config.num_moe_layers * store.expert_bytes) == 2
    assert slots_for(store, experts=99) == store.config.n_routed_experts


def _config_and_state():
    model = caee_jax.init_random("tiny")
    return model.config, model.state


def test_offload_refuses_a_mesh_and_a_non_loop_backend():
    with pytest.raises(ValueError, match="one device"):
        caee_jax.init_random("tiny", mesh="expert=8", offload=Offload("host"))
    with pytest.raises(ValueError, match="loop"):
        caee_jax.init_random("tiny", execution="dense", offload=Offload("host"))


def run_py(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, os.path.join(ROOT, "launch", "run.py"), "--preset", "tiny", "--max-new-tokens", "4"]
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_run_py_reports_offload_statistics_and_draws_the_timeline(store_dir, tmp_path):
    plot = tmp_path / "timeline.png"
    result = run_py(
        "--offload", "disk", "--store-dir", store_dir, "--cache-experts", "0.25", "--offload-plot", str(plot), "--json"
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    offload = report["offload"]
    assert offload["store"] == "disk" and offload["slots_per_layer"] == 4
    assert len(offload["decode_steps"]) == 3 and offload["prefill"]["misses"] > 0
    assert plot.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--offload", "disk"], "--offload disk needs --store-dir DIR"),
        (["--cache-experts", "4"], "--cache-experts need --offload host|disk"),
        (["--offload", "host", "--backend", "dense"], "loop"),
        (["--offload", "disk", "--store-dir", "/nonexistent/store"], "/nonexistent/store: not an expert store"),
        (["--offload-plot", "x.png"], "--offload-plot needs --offload"),
        (["--offload", "host", "--cache-bytes", "1KiB"], "holds nothing; the minimum is"),
        (["--offload", "host", "--mesh", "expert=8"], "one device"),
    ],
)
def test_run_py_refuses_offload_mistakes_in_one_line(flags, message, capsys):
    assert run_module().main(["--preset", "tiny", "--max-new-tokens", "2", *flags]) == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1


def test_cache_budgets_take_a_count_a_fraction_or_a_size(capsys):
    assert options.cache_budget("16") == 16 and options.cache_budget("0.25") == 0.25
    assert options.byte_size("512MiB") == 512 * 2**20 and options.byte_size("2GB") == 2 * 10**9
    assert options.byte_size("4096") == 4096
    for bad in ("0", "1.5GiB", "12XB", "MiB"):
        with pytest.raises(SystemExit):
            run_module().parse_args(["--offload", "host", "--cache-bytes", bad])
        assert "a size such as 536870912, 512MiB or 2GB" in capsys.readouterr().err
    for bad in ("0", "1.5", "-2", "nan", "lots"):
        with pytest.raises(SystemExit):
            run_module().parse_args(["--offload", "host", "--cache-experts", bad])
        assert "a whole number of experts >= 1, or a fraction in (0, 1)" in capsys.readouterr().err


def run_module():
    """launch/run.py as a module, to call its main in this process."""
    spec = importlib.util.spec_from_file_location("run", os.path.join(ROOT, "launch", "run.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def counting_announces(manager) -> list[int]:
    """Records the layer of every `announce` callback the compiled steps make from now on (patch it before
    the first step is traced: the callback is bound when tracing)."""
    calls, announce = [], manager.announce

    def counted(layer, *args, **kwargs):
        calls.append(int(layer))
        return announce(layer, *args, **kwargs)

    manager.announce = counted
    return calls


def test_a_step_that_reads_nothing_makes_no_host_callback(resident):
    """Every expert fits: once the prompts' experts are loaded, running them again calls the host never, and
    the hits are still counted (on the device)."""
    model = offloaded(Offload("host", experts=16))
    calls = counting_announces(model.execution.offload)
    assert caee_jax.generate(model, PROMPTS, max_new_tokens=6) == resident[1]
    assert calls, "the cold run made no callback: the counter sees nothing"
    calls.clear()
    again = caee_jax.generate_with_stats(model, PROMPTS, max_new_tokens=6)
    assert again.tokens == resident[1]
    assert calls == []
    stats = [again.prefill_offload, *again.decode_offload]
    assert sum(s.misses + s.fetches for s in stats) == 0 and all(s.hits > 0 for s in stats)


@functools.partial(jax.jit, static_argnames=("manager",), donate_argnames=("cache",))
def _first_layer(x, topk_ids, keep_mask, cache, *, manager):
    """MoE layer 0 offloaded on its own (no prediction of the next layer): the updated cache."""
    weights = jnp.full(topk_ids.shape, 0.25, jnp.float32)
    no_hint = jnp.zeros(manager.num_experts, bool)
    return run_offloaded(x, topk_ids, weights, keep_mask, cache, jnp.int32(0), manager, no_hint)[1]


def test_eviction_sees_the_uses_of_a_step_that_made_no_callback():
    """LRU with 4 slots: experts 0-3 loaded, then 0 and 1 hit (no callback), then two misses evict 2 and 3,
    the least recently used; a history kept only by callbacks would see 0-3 tied and evict 0 and 1."""
    config, state = _config_and_state()
    manager = CacheManager(HostStore.from_state(config, state), slots=4, policy="lru")
    calls = counting_announces(manager)
    cache = manager.empty_cache()
    x = np.random.default_rng(0).normal(size=(1, config.hidden_size)).astype(np.float32)
    steps = [  # (routed [1, K], kept [1, K]): one token
        ([0, 1, 2, 3], [True] * 4),
        ([0, 1, 2, 3], [True, True, False, False]),
        ([4, 5, 0, 1], [True, True, False, False]),
    ]
    counted = []
    for ids, keep in steps:
        cache = _first_layer(x, np.array([ids], np.int32), np.array([keep]), cache, manager=manager)
        counted.append(manager.take_step_stats(cache))
    assert calls == [0, 0]  # the first and the last step: the hits-only step made none
    assert sorted(np.flatnonzero(manager.slot_of[0] >= 0)) == [0, 1, 4, 5]
    np.testing.assert_array_equal(np.asarray(cache.slot_of[0]), manager.slot_of[0])
    assert [(s.hits, s.misses, s.pruned_misses, s.fetches) for s in counted] == [
        (0, 4, 0, 4),
        (2, 0, 0, 0),
        (0, 2, 0, 2),
    ]


def test_an_offloaded_layer_calls_the_host_without_a_jax_effect():
    """Its host calls are `host_call`s: the program has no jax effect, so jax keeps its fast dispatch path (an
    effect cost ~2 ms per decode step, called or not), and the calls are side-effecting custom calls to XLA."""
    config, state = _config_and_state()
    manager = CacheManager(HostStore.from_state(config, state), slots=4)
    x = np.zeros((1, config.hidden_size), np.float32)
    ids, keep = np.array([[0, 1, 2, 3]], np.int32), np.ones((1, 4), bool)
    traced = _first_layer.trace(x, ids, keep, manager.empty_cache(), manager=manager)
    assert traced.jaxpr.effects == set()
    assert "caee_host_call" in str(traced.jaxpr) and "has_side_effect = true" in traced.lower().as_text()


def test_hold_writes_the_experts_bits_into_their_slots():
    """`CacheManager.hold` (calibration's chosen residency) stores the weights' bits, as fetches do, not
    their values converted to the cache's integer type."""
    config, state = _config_and_state()
    manager = CacheManager(HostStore.from_state(config, state), slots=4)
    cache = manager.hold(manager.empty_cache(), 1, [7, 3])
    for slot, expert in enumerate([7, 3]):
        want = manager.store.read(1, expert)
        for got, weights in zip(cache[:3], want, strict=True):
            np.testing.assert_array_equal(np.asarray(got[1, slot]).view(np.float32), weights)
    assert manager.slot_of[1, 7] == 0 and int(cache.slot_of[1, 3]) == 1
