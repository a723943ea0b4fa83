"""Cost tables (signature, JSON, static compilation), prediction arithmetic, calibration mechanics."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import compile_counter

import caee_jax
from caee_jax.caee.cost_model import predict
from caee_jax.caee.cost_table import (
    CostTable,
    CostTableError,
    DeviceCosts,
    FitQuality,
    block_placement,
    load_table,
    save_table,
    table_for,
)
from caee_jax.calibration.costs import calibrate, nonnegative_lstsq, random_cases, validate
from caee_jax.calibration.tables import signature_of
from caee_jax.config import preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIT = FitQuality(samples=1, r2=1.0, mape=0.0, median_abs_residual_s=0.0, max_abs_residual_s=0.0)


def two_device_table(backend="pallas", **changes) -> CostTable:
    """8 experts on 2 devices; device 1 is twice as slow per pair."""
    signature = signature_of(preset("tiny"), None, jnp.float32, backend)
    signature = dataclasses.replace(signature, n_routed_experts=8, num_experts_per_tok=2)
    devices = (
        DeviceCosts(fixed_s=1e-4, pair_s=1e-5, activation_s=1e-3, fetch_s=(0.0, 2e-3, 5e-2), comm_token_s=1e-6),
        DeviceCosts(fixed_s=1e-4, pair_s=2e-5, activation_s=1e-3, fetch_s=(0.0, 2e-3, 5e-2), comm_token_s=1e-6),
    )
    return dataclasses.replace(CostTable(signature, devices, block_placement(8, 2), FIT), **changes)


def test_prediction_is_the_documented_sum():
    table = two_device_table()
    # 3 tokens, top-2. Kept pairs: device 0 experts {0: 2 pairs, 1: 1}; device 1 experts {5: 1}; one pair pruned.
    ids = jnp.array([[0, 5], [0, 1], [6, 1]])
    keep = jnp.array([[True, True], [True, True], [False, False]])
    device_s, layer_s = predict(table, ids, keep)
    want0 = 1e-4 + 3 * 1e-5 + 2 * 1e-3 + 3 * 1e-6
    want1 = 1e-4 + 1 * 2e-5 + 1 * 1e-3 + 3 * 1e-6
    np.testing.assert_allclose(np.asarray(device_s), [want0, want1], rtol=1e-6)
    assert float(layer_s) == pytest.approx(max(want0, want1), rel=1e-6)
    # Residency: expert 5 on disk, expert 1 in host RAM, expert 6 (not run) on disk: only run experts pay.
    residency = jnp.array([0, 1, 0, 0, 0, 2, 2, 0])
    device_s, _ = predict(table, ids, keep, residency)
    np.testing.assert_allclose(np.asarray(device_s), [want0 + 2e-3, want1 + 5e-2], rtol=1e-6)


def test_an_offloaded_layer_pays_its_tiers_layer_costs_once():
    """offload_layer_s: once per device that holds a non-resident expert (its largest tier's), run or not;
    offload_read_s: once per device that runs one; nothing on a device whose experts are all resident, nor
    without residency."""
    layer_s, read_s = (0.0, 3e-3, 7e-3), (0.0, 1e-4, 2e-4)
    table = two_device_table()
    changed = [dataclasses.replace(d, offload_layer_s=layer_s, offload_read_s=read_s) for d in table.devices]
    table = dataclasses.replace(table, devices=tuple(changed))
    ids = jnp.array([[0, 5], [0, 1], [6, 1]])
    keep = jnp.array([[True, True], [True, True], [False, False]])
    plain = np.asarray(predict(two_device_table(), ids, keep, jnp.array([0, 1, 0, 0, 0, 2, 2, 0])).device_s)
    device_s = predict(table, ids, keep, jnp.array([0, 1, 0, 0, 0, 2, 2, 0])).device_s
    np.testing.assert_allclose(np.asarray(device_s), plain + [3e-3 + 1e-4, 7e-3 + 2e-4], rtol=1e-6)
    device_s = predict(table, ids, keep, jnp.array([0, 0, 0, 1, 0, 0, 0, 0])).device_s  # expert 3 is not run
    np.testing.assert_allclose(np.asarray(device_s), np.asarray(predict(table, ids, keep).device_s) + [3e-3, 0])


def test_a_table_without_offload_layer_costs_loads_with_zero(tmp_path):
    """Tables written before offload_layer_s and offload_read_s existed keep working: the terms are 0, the rest
    unchanged."""
    data = two_device_table().to_json()
    for device in data["devices"]:
        del device["offload_layer_s"], device["offload_read_s"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    table = load_table(str(path))
    assert table == two_device_table() and table.devices[0].offload_layer_s == table.devices[1].offload_read_s
    assert table.devices[0].offload_layer_s == (0.0, 0.0, 0.0)


def test_the_loop_backend_pays_for_whole_tiles():
    """The loop backend computes an expert's pairs in tiles (8 rows here): 1 or 2 pairs cost 8 rows."""
    ids = jnp.array([[0, 5], [0, 1], [6, 1]])
    keep = jnp.array([[True, True], [True, True], [False, False]])
    device_s, _ = predict(two_device_table("loop"), ids, keep)
    want0 = 1e-4 + 16 * 1e-5 + 2 * 1e-3 + 3 * 1e-6  # experts 0 (2 pairs) and 1 (1 pair): a tile each
    want1 = 1e-4 + 8 * 2e-5 + 1 * 1e-3 + 3 * 1e-6
    np.testing.assert_allclose(np.asarray(device_s), [want0, want1], rtol=1e-6)


def test_the_table_is_compiled_in_and_only_a_new_table_recompiles():
    fn = jax.jit(predict, static_argnums=0)
    rng = np.random.default_rng(0)
    table = two_device_table()
    cases = [  # new routing, keep masks and residency, same shapes (numpy: no eager JAX op compiles)
        (
            np.stack([rng.permutation(8)[:2] for _ in range(4)]).astype(np.int32),
            rng.random((4, 2)) < 0.5,
            rng.integers(0, 3, 8).astype(np.int32),
        )
        for _ in range(6)
    ]
    with compile_counter() as compiles:
        fn(table, *cases[0])
        first = len(compiles)
        for case in cases[1:]:
            fn(table, *case)
        assert len(compiles) == first
        fn(dataclasses.replace(table, devices=(table.devices[1], table.devices[1])), *cases[0])
        assert len(compiles) == first + 1


def test_json_round_trip_and_signature_checks(tmp_path):
    table = two_device_table()
    path = save_table(table, str(tmp_path))
    assert os.path.basename(path) == table.signature.slug() + ".json"
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []
    assert load_table(path, table.signature) == table
    assert table_for(table.signature, str(tmp_path)) == table
    data = json.load(open(path))
    assert data["units"] == "seconds"

    other = dataclasses.replace(table.signature, device_kind="TPU v5p", num_processes=2)
    with pytest.raises(CostTableError, match=r"device_kind: table 'cpu', here 'TPU v5p'; num_processes: table 1"):
        load_table(path, other)
    assert load_table(path, other, override=True) == table


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"format": "other"}', "is not 'caee-cost-table/1'"),
        ("MALFORMED", "malformed"),
    ],
)
def test_bad_table_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "table.json"
    if content == "MALFORMED":
        data = two_device_table().to_json()
        del data["devices"][0]["pair_s"]
        content = json.dumps(data)
    path.write_text(content)
    with pytest.raises(CostTableError, match=message) as info:
        load_table(str(path))
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["devices"][1].update(pair_s=float("nan")), r"devices\[1\]\.pair_s is nan; costs are finite"),
        (lambda d: d["devices"][0].update(activation_s=-1e-3), r"devices\[0\]\.activation_s is -0.001"),
        (lambda d: d["devices"][0].update(fetch_s=[0.0, 1e-3]), r"devices\[0\]\.fetch_s has 2 entries"),
        (lambda d: d["devices"][1].update(offload_layer_s=[0.0, -1.0, 0.0]), r"devices\[1\]\.offload_layer_s is -1.0"),
        (lambda d: d["devices"][0].update(fixed_s="1e-4"), r"devices\[0\]\.fixed_s is '1e-4'"),
        (lambda d: d.update(devices=[]), "devices is empty"),
    ],
    ids=["nan", "negative", "tiers", "negative-offload", "string", "no-devices"],
)
def test_impossible_costs_are_refused_naming_file_and_field(tmp_path, change, message):
    """A NaN or negative cost would silently change every pruning decision: refused on reading."""
    data = two_device_table().to_json()
    change(data)
    path = tmp_path / "table.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CostTableError, match=message) as info:
        load_table(str(path))
    assert str(info.value).startswith(f"{path}: ")


def test_missing_table_and_bad_placement_are_errors(tmp_path):
    with pytest.raises(CostTableError, match="no such cost table"):
        table_for(two_device_table().signature, str(tmp_path))
    with pytest.raises(CostTableError, match="placement has 7 entries for 8 experts"):
        two_device_table(placement=(0,) * 7)


def test_nonnegative_least_squares():
    rng = np.random.default_rng(0)
    features = np.column_stack([np.ones(50), rng.uniform(0, 10, 50), rng.uniform(0, 5, 50)])
    assert np.allclose(nonnegative_lstsq(features, features @ [0.5, 2.0, 3.0]), [0.5, 2.0, 3.0])
    coef = nonnegative_lstsq(features, features @ [-1.0, 2.0, 3.0])  # a negative intercept is not allowed
    assert (coef >= 0).all() and coef[0] == 0


def test_random_cases_cover_sizes_skew_and_pruning():
    cases = random_cases(0, 6, num_experts=16, top_k=4)
    assert {c.num_tokens for c in cases} == {1, 2, 4, 8, 16, 32, 64}
    for case in cases:
        assert all(len(set(row)) == 4 for row in case.topk_ids.tolist())  # distinct experts per token
    assert any(not c.keep_mask.all() for c in cases) and any(c.keep_mask.all() for c in cases)


@pytest.mark.timing
def test_calibrate_and_validate_one_device():
    model = caee_jax.init_random("tiny", seed=0)
    table = calibrate(model, cases_per_size=2, repeats=2)
    assert table.signature == signature_of(model.config, None, jnp.float32, "loop")
    (device,) = table.devices
    assert device.pair_s > 0 or device.activation_s > 0
    assert device.fetch_s[0] == 0 and device.fetch_s[1] > 0 and device.fetch_s[2] > 0
    result = validate(model, table, cases_per_size=1, repeats=2)
    assert len(result.measured_s) == 7 and np.isfinite(result.mape)


# The slowed variant ("1:2", 33 s) is left out of the suite for time; the signature of a slowed table is
# tested in tests/test_straggler.py.
@pytest.mark.parametrize("slow", [None])
def test_two_process_calibration_writes_an_expert_parallel_table(tmp_path, slow):
    """With --slow-process the table records the condition in its signature (and file name). Each device's
    fetch times are its own process's."""
    command = [sys.executable, "launch/calibrate.py", "--preset", "tiny", "--local-processes", "2", "--json"]
    command += ["--out", str(tmp_path), "--cases-per-size", "1", "--repeats", "2", "--scratch-dir", str(tmp_path)]
    command += ["--slow-process", slow] if slow else []
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    table = load_table(report["table"])
    assert (table.signature.num_processes, table.signature.mesh) == (2, "data=1,expert=2,tensor=1")
    assert table.signature.slowed == (slow or "") and report["table"].endswith(
        "-slow1x2.json" if slow else "-loop.json"
    )
    assert table.placement == block_placement(16, 2)
    assert len(table.devices) == 2 and table.fit.samples == 7
    assert all(d.fetch_s[1] > 0 for d in table.devices) and table.devices[0].fetch_s != table.devices[1].fetch_s
