"""The disk expert store: bit-exact round trip, 4 KiB records, checksums, refusals, atomic writes, prefetch."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fcntl
import json
import os
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import caee_jax
from caee_jax.offload import disk_store
from caee_jax.offload.cache import Offload
from caee_jax.offload.disk_store import ALIGNMENT, MANIFEST, RECORDS, DiskStore, write_disk_store
from caee_jax.offload.store import EXPERT_PATHS, HostStore, StoreError, expert_stacks
from caee_jax.routing.backend import ExpertWeights
from caee_jax.runtime import steps
from checkpoints_tools import expert_store


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def written(request, tmp_path_factory):
    """(model, store directory) for the tiny preset in each dtype."""
    model = caee_jax.init_random("tiny", dtype=request.param)
    directory = str(tmp_path_factory.mktemp(request.param) / "store")
    write_disk_store(directory, model.config, model.state, source="tiny")
    return model, directory


@pytest.fixture
def copy(written, tmp_path):
    """(model, a private copy of the store to damage)."""
    model, directory = written
    return model, shutil.copytree(directory, tmp_path / "store")


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return (
        a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(f"u{a.itemsize}"), b.view(f"u{b.itemsize}"))
    )


def assert_same_expert(got, expected) -> None:
    for name, x, y in zip(got._fields, got, expected, strict=True):
        assert same_bits(np.asarray(x), np.asarray(y)), name


def test_round_trip_equals_host_store_bit_for_bit(written):
    model, directory = written
    host = HostStore.from_state(model.config, model.state)
    config = model.config
    with DiskStore(directory, config, model.dtype) as store:
        assert store.tier == "disk" and store.tier_index == 2 and store.expert_bytes == host.expert_bytes
        for layer in range(config.num_moe_layers):
            for expert in range(config.n_routed_experts):
                assert_same_expert(store.read(layer, expert), host.read(layer, expert))
            experts = list(range(config.n_routed_experts))[::-1]
            for expert, got in zip(experts, store.read_many(layer, experts), strict=True):
                assert_same_expert(got, host.read(layer, expert))


def test_records_start_and_end_on_4k_boundaries(written):
    model, directory = written
    config = model.config
    store = DiskStore(directory, config, model.dtype)
    store.close()
    size, expert = store.record_bytes, store.expert_bytes
    assert size % ALIGNMENT == 0 and expert <= size < expert + ALIGNMENT
    records = config.num_moe_layers * config.n_routed_experts
    assert os.path.getsize(os.path.join(directory, RECORDS)) == records * size
    host = HostStore.from_state(config, model.state)
    with open(os.path.join(directory, RECORDS), "rb") as f:
        f.seek((1 * config.n_routed_experts + 5) * size)
        record = f.read(size)
    gate = host.read(1, 5).gate
    assert record[: gate.nbytes] == gate.tobytes() and record[expert:] == bytes(size - expert)


def flip_byte(directory, offset: int) -> None:
    with open(os.path.join(directory, RECORDS), "r+b") as f:
        f.seek(offset)
        value = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([value ^ 0x10]))


def test_flipped_byte_is_a_store_error_naming_layer_and_expert(copy):
    model, directory = copy
    config = model.config
    with DiskStore(directory, config, model.dtype) as store:
        flip_byte(directory, (1 * config.n_routed_experts + 5) * store.record_bytes + 123)
        with pytest.raises(StoreError, match="layer 1 expert 5: checksum mismatch"):
            store.read(1, 5)
        with pytest.raises(StoreError, match="layer 1 expert 5"):
            store.read_many(1, [4, 5])
        store.prefetch(1, [5])
        with pytest.raises(StoreError, match="layer 1 expert 5"):
            store.read(1, 5)
        store.read(1, 4)
        store.read(0, 5)


def test_truncated_file_is_refused_naming_layer_and_expert(copy):
    model, directory = copy
    config = model.config
    path = os.path.join(directory, RECORDS)
    with DiskStore(directory, config, model.dtype) as store:
        cut = (1 * config.n_routed_experts + 3) * store.record_bytes + 100
        os.truncate(path, cut)
        with pytest.raises(StoreError, match="layer 1 expert 3: record truncated"):
            store.read(1, 3)
        store.read(1, 2)
    with pytest.raises(StoreError, match="truncated .* layer 1 expert 3"):
        DiskStore(directory, config, model.dtype)


def test_store_for_another_model_is_refused_naming_the_field(written):
    model, directory = written
    other = dataclasses.replace(model.config, moe_intermediate_size=32)
    with pytest.raises(StoreError, match="moe_intermediate_size 24 .the model has 32"):
        DiskStore(directory, other, model.dtype)
    other_dtype = "float32" if model.dtype != np.float32 else "bfloat16"
    with pytest.raises(StoreError, match=rf"another model: dtype '\w+' \(the model has '{other_dtype}'\)$"):
        DiskStore(directory, model.config, caee_jax.api.DTYPES[other_dtype])
    with pytest.raises(StoreError, match="fingerprint"):
        DiskStore(directory, model.config, model.dtype, expected_fingerprint="0" * 64)
    with pytest.raises(StoreError, match="not an expert store"):
        DiskStore(os.path.dirname(directory), model.config, model.dtype)


def test_manifest_records_the_dims_checksums_and_source(written):
    model, directory = written
    with open(os.path.join(directory, MANIFEST)) as f:
        manifest = json.load(f)
    assert manifest["format"] == "caee-expert-store" and manifest["source"] == "tiny"
    assert manifest["hidden_size"] == model.config.hidden_size and manifest["dtype"] == np.dtype(model.dtype).name
    assert np.shape(manifest["crc32"]) == (model.config.num_moe_layers, model.config.n_routed_experts)
    with DiskStore(directory, model.config, model.dtype, expected_fingerprint=manifest["fingerprint"]) as store:
        assert store.fingerprint == manifest["fingerprint"]


def test_interrupted_write_leaves_no_target(tmp_path, monkeypatch):
    model = caee_jax.init_random("tiny")
    target = tmp_path / "store"
    real, calls = disk_store._write_record, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 20:  # inside layer 1
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(disk_store, "_write_record", failing)
    with pytest.raises(KeyboardInterrupt):
        write_disk_store(str(target), model.config, model.state)
    assert not target.exists() and not (tmp_path / "store.partial").exists()
    monkeypatch.undo()
    (tmp_path / "store.partial").mkdir()  # as a killed run leaves it
    write_disk_store(str(target), model.config, model.state)
    assert sorted(os.listdir(target)) == [RECORDS, MANIFEST]
    with pytest.raises(StoreError, match="exists"):
        write_disk_store(str(target), model.config, model.state)


def test_prefetch_then_read_returns_the_prefetched_arrays(copy):
    model, directory = copy
    host = HostStore.from_state(model.config, model.state)
    with DiskStore(directory, model.config, model.dtype, staging=4) as store:
        store.prefetch(1, [2, 3])
        concurrent.futures.wait(list(store._staged.values()))
        os.truncate(os.path.join(directory, RECORDS), 0)  # only the staged copies remain readable
        assert_same_expert(store.read(1, 2), host.read(1, 2))
        assert_same_expert(store.read_many(1, [3])[0], host.read(1, 3))
        with pytest.raises(StoreError, match="layer 1 expert 4"):
            store.read(1, 4)
        with pytest.raises(StoreError, match="layer 1 expert 2"):
            store.read(1, 2)  # taken from staging once
        store.prefetch(0, range(10))  # a full staging area drops nothing: the first 4 stay
        assert list(store._staged) == [(0, e) for e in range(4)]
        store.retain(0, [3, 1])  # a layer's needs make room, whatever was staged first
        store.prefetch(1, [5, 6, 7])
        assert list(store._staged) == [(0, 1), (0, 3), (1, 5), (1, 6)]


def test_out_of_range_ids_and_closed_store(written):
    model, directory = written
    store = DiskStore(directory, model.config, model.dtype)
    with pytest.raises(StoreError, match="layer 7 out of range"):
        store.read(7, 0)
    with pytest.raises(StoreError, match="layer 0: expert 16 out of range"):
        store.prefetch(0, [16])
    with pytest.raises(StoreError, match="layer 0: expert -1 out of range"):
        store.read_many(0, [3, -1])
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.read(0, 0)
    with pytest.raises(StoreError, match="closed"):
        store.read_many(0, [0])


def test_o_direct_is_used_where_the_filesystem_allows_it(written):
    model, directory = written
    try:
        os.close(os.open(os.path.join(directory, RECORDS), os.O_RDONLY | os.O_DIRECT))
    except (AttributeError, OSError):
        pytest.skip("the test filesystem refuses O_DIRECT")
    with DiskStore(directory, model.config, model.dtype) as store:
        assert store.direct
        assert fcntl.fcntl(store._fd, fcntl.F_GETFL) & os.O_DIRECT


def test_cli_writes_a_store_and_refuses_user_mistakes(tmp_path, capsys):
    out = str(tmp_path / "store")
    assert expert_store.main(["--preset", "tiny", "--out", out, "--dtype", "bfloat16", "--no-progress"]) == 0
    model = caee_jax.init_random("tiny", dtype="bfloat16")
    with DiskStore(out, model.config, model.dtype) as store:
        assert_same_expert(store.read(1, 7), HostStore.from_state(model.config, model.state).read(1, 7))
    capsys.readouterr()
    assert expert_store.main(["--preset", "tiny", "--out", out]) == 2
    assert expert_store.main(["--preset", "nope", "--out", str(tmp_path / "x")]) == 2
    assert expert_store.main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(line.startswith("error: ") for line in errors)
    assert "exists" in errors[0] and "unknown preset" in errors[1] and "not a checkpoint directory" in errors[2]


class LayerByLayer:
    """An expert stack that exists one layer at a time (`stack[layer]` builds it): records what was built."""

    def __init__(self, stack: np.ndarray):
        self.stack, self.shape, self.dtype, self.built = stack, stack.shape, stack.dtype, []

    def __getitem__(self, layer: int) -> np.ndarray:
        self.built.append(layer)
        return self.stack[layer].copy()


def test_a_store_is_written_from_stacks_built_layer_by_layer(written, tmp_path):
    model, directory = written
    stacks = [LayerByLayer(np.asarray(w)) for w in expert_stacks(model.state)]
    manifest = write_disk_store(str(tmp_path / "lazy"), model.config, ExpertWeights(*stacks))
    assert manifest["fingerprint"] == disk_store.read_manifest(directory)["fingerprint"]
    assert all(s.built == list(range(model.config.num_moe_layers)) for s in stacks)


def test_init_random_with_a_disk_store_never_draws_the_routed_experts(written):
    model, directory = written
    offload = Offload(store="disk", directory=directory, experts=2)
    offloaded = caee_jax.init_random("tiny", dtype=model.dtype, offload=offload)
    gate = dict(nnx.to_flat_state(offloaded.state))[("moe_layers", "ffn", "gate_proj")].get_value()
    assert gate.shape[1] == 0
    assert len(caee_jax.generate(offloaded, [[1, 2, 3]], max_new_tokens=3)[0]) > 0
    offloaded.execution.offload.store.close()


def test_bfloat16_experts_under_a_float32_model_match_the_rounded_resident_model(tmp_path):
    model = caee_jax.init_random("tiny", dtype="float32")
    flat = dict(nnx.to_flat_state(model.state))
    for path in EXPERT_PATHS.values():
        rounded = flat[path].get_value().astype("bfloat16")
        flat[path] = flat[path].replace(rounded.astype("float32"))
    model.state = nnx.from_flat_state(flat)
    stacks = ExpertWeights(*(np.asarray(w).astype(ml_dtypes.bfloat16) for w in expert_stacks(model.state)))
    write_disk_store(str(tmp_path / "bf16"), model.config, stacks)
    offload = Offload(store="disk", directory=str(tmp_path / "bf16"), experts=2, dtype="bfloat16")
    offloaded = caee_jax.Model(nnx.merge(model.graphdef, model.state), offload=offload)
    assert offloaded.expert_cache.gate.dtype == jnp.uint16  # bfloat16 bits
    tokens = np.arange(24).reshape(2, 12) % model.config.vocab_size
    assert same_bits(np.asarray(offloaded(tokens)), np.asarray(model(tokens)))
    ids, cache = tokens.astype(np.int32), offloaded.expert_cache
    lowered = steps.logits.lower(offloaded.graphdef, offloaded.state, ids, cache, execution=offloaded.execution)
    whole_cache = "f32[{},{},{},{}]".format(*offloaded.expert_cache.gate.shape)
    assert whole_cache not in lowered.compile().as_text()  # never converted as a whole, only per expert
    offloaded.execution.offload.store.close()
