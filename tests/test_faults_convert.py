"""checkpoints_tools.convert_hf under faults: two runs on one output, a damaged unit, overlapping safetensors
offsets, a config.json that is not an object, and the expert means beside a bundled-model-like checkpoint.

The source is a tiny transformers DeepseekV3 (float32, one file, no MTP tensors: four units) with the
bundled model's tokenizer files and an expert-means file made for its config.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors
from conftest import make_hf_model, random_tokens
from test_convert import REPO, files_of, quiet

import caee_jax
from caee_jax.api import BUNDLED_MODEL
from caee_jax.caee import expert_means, importance
from caee_jax.config import ConfigError, ModelConfig
from caee_jax.weights.safetensors_io import CheckpointError, SafetensorsFile
from checkpoints_tools import convert_hf

ENV = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """An HF directory like the bundled model's: weights, config, tokenizer files and expert means."""
    directory = tmp_path_factory.mktemp("source") / "hf"
    make_hf_model(seed=31).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(BUNDLED_MODEL, name), directory)
    config = ModelConfig.from_hf(directory)
    rng = np.random.default_rng(0)
    tokens, shape = 10, (config.num_moe_layers, config.n_routed_experts, config.hidden_size)
    counts = np.stack([rng.multinomial(tokens * config.num_experts_per_tok, [1 / shape[1]] * shape[1])] * shape[0])
    calibration = expert_means.Calibration(rng.standard_normal(shape).astype(np.float32), counts, tokens)
    expert_means.save(os.path.join(directory, expert_means.FILENAME), calibration, config)
    scale = np.ones(shape[:2], np.float32)
    sensitivity = np.ones(shape[0], np.float32)
    weights = importance.Calibration(scale, sensitivity, sensitivity, sensitivity, "kl", counts, tokens, "0" * 64)
    importance.save(os.path.join(directory, importance.FILENAME), weights, config)
    return str(directory)


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("converted") / "out")
    convert_hf.convert(source, out, "float32", progress=False, log=quiet)
    return out


STALLED_RUN = """
import os, sys, time
from checkpoints_tools import convert_hf
save = convert_hf.save_unit
def save_then_wait(path, values):
    save(path, values)
    if not os.path.exists(sys.argv[3]):  # the first unit is on disk, its completion marker is not
        open(sys.argv[3], "w").close()
        while not os.path.exists(sys.argv[4]):
            time.sleep(0.05)
convert_hf.save_unit = save_then_wait
sys.exit(convert_hf.main(["--hf-dir", sys.argv[1], "--out", sys.argv[2], "--dtype", "float32", "--no-progress"]))
"""


def test_a_second_run_on_the_same_out_stops_and_touches_nothing(source, tmp_path):
    out, stalled, go = str(tmp_path / "out"), str(tmp_path / "stalled"), str(tmp_path / "go")
    first = subprocess.Popen([sys.executable, "-c", STALLED_RUN, source, out, stalled, go], cwd=REPO, env=ENV)
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(stalled):
            assert first.poll() is None and time.monotonic() < deadline, "the first run ended before stalling"
            time.sleep(0.05)
        before = files_of(out + ".partial")
        second = subprocess.run(
            [sys.executable, "-m", "checkpoints_tools.convert_hf", "--hf-dir", source, "--out", out]
            + ["--dtype", "float32", "--no-progress"],
            cwd=REPO,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert second.returncode == 2, second.stderr
        error = f"error: another run holds {out} (pid {first.pid}); wait for it or choose another output"
        assert second.stderr.splitlines()[-1] == error  # after the source check's note on the missing MTP tensors
        assert files_of(out + ".partial") == before and not os.path.exists(out)
    finally:
        open(go, "w").close()
        assert first.wait(timeout=300) == 0
    tokens = random_tokens(131, (1, 7), seed=5)
    np.testing.assert_array_equal(np.asarray(caee_jax.load(out)(tokens)), np.asarray(caee_jax.load(source)(tokens)))


def damage_after_save(monkeypatch, unit: str, damage) -> None:
    """Runs damage(path) right after the converter saves `unit` (as another process replacing it would)."""
    save = convert_hf.save_unit

    def save_then_damage(path, values):
        save(path, values)
        if path.endswith(unit):
            damage(path)

    monkeypatch.setattr(convert_hf, "save_unit", save_then_damage)


def test_a_damaged_unit_is_never_published_and_a_rerun_rewrites_it(source, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    damage_after_save(monkeypatch, "moe_layers/001", lambda path: shutil.rmtree(os.path.join(path, "d")))
    with pytest.raises(convert_hf.ConversionError, match=r"moe_layers/001: damaged Orbax item.*not publishing"):
        convert_hf.convert(source, out, "float32", progress=False, log=quiet)
    assert not os.path.exists(out)
    assert sorted(os.listdir(os.path.join(out + ".partial", ".done"))) == ["dense_layers.000", "moe_layers.000", "top"]

    monkeypatch.undo()
    summary = convert_hf.convert(source, out, "float32", progress=False, log=quiet)
    assert (summary["skipped"], summary["written"]) == (3, 1)
    tokens = random_tokens(131, (1, 7), seed=6)
    np.testing.assert_array_equal(np.asarray(caee_jax.load(out)(tokens)), np.asarray(caee_jax.load(source)(tokens)))


def test_a_unit_without_its_marker_is_never_published(source, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    marker = os.path.join(out + ".partial", ".done", "top")
    damage_after_save(monkeypatch, "moe_layers/001", lambda _: os.remove(marker))
    with pytest.raises(convert_hf.ConversionError, match=r"unit top is not marked complete; not publishing"):
        convert_hf.convert(source, out, "float32", progress=False, log=quiet)
    assert not os.path.exists(out)


def test_verify_names_the_damaged_units_without_a_traceback(source, converted, tmp_path, capsys):
    damaged = shutil.copytree(converted, tmp_path / "damaged")
    shutil.rmtree(damaged / "moe_layers" / "001" / "d")
    shutil.rmtree(damaged / "dense_layers" / "000")
    args = ["--hf-dir", source, "--out", str(damaged), "--verify", "--verify-samples", "1000"]
    assert convert_hf.main(args) == 2
    err = capsys.readouterr().err
    assert f"DAMAGED {damaged}/moe_layers/001: damaged Orbax item" in err
    assert f"DAMAGED {damaged}/dense_layers/000: missing item" in err
    assert "2 of 4 units damaged (dense_layers/000, moe_layers/001)" in err and "Traceback" not in err


def write_safetensors(path, header: dict, data: bytes) -> None:
    encoded = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded + data)


F32_2 = {"dtype": "F32", "shape": [2]}  # 8 bytes
LAYOUTS = {
    "overlap": (
        {"a": {**F32_2, "data_offsets": [0, 8]}, "b": {**F32_2, "data_offsets": [0, 8]}},
        8,
        r"tensors 'a' and 'b' overlap \(bytes 0\.\.8 of the data section\)",
    ),
    "gap": (
        {"a": {**F32_2, "data_offsets": [0, 8]}, "b": {**F32_2, "data_offsets": [12, 20]}},
        20,
        r"tensor 'b' starts at byte 12, leaving a gap after tensor 'a'",
    ),
    "trailing bytes": (
        {"a": {**F32_2, "data_offsets": [0, 8]}},
        12,
        r"4 bytes after the last tensor's data belong to no tensor",
    ),
}


@pytest.mark.parametrize("case", sorted(LAYOUTS))
def test_headers_are_held_to_the_safetensors_library_rules(tmp_path, case):
    header, data_size, message = LAYOUTS[case]
    path = tmp_path / "x.safetensors"
    write_safetensors(path, header, bytes(data_size))
    with pytest.raises(Exception):  # the reference library rejects the file too  # noqa: B017
        safetensors.safe_open(str(path), framework="numpy")
    with pytest.raises(CheckpointError, match=f"{path}: {message}"):
        SafetensorsFile(str(path))


def test_overlapping_experts_are_refused_naming_file_and_tensors(source, tmp_path, capsys):
    """Expert 8's offsets pointing at expert 7's bytes used to convert expert 8 as a copy of expert 7."""
    copy = shutil.copytree(source, tmp_path / "src")
    path = copy / "model.safetensors"
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    seventh, eighth = (f"model.layers.2.mlp.experts.{e}.up_proj.weight" for e in (7, 8))
    header[eighth]["data_offsets"] = header[seventh]["data_offsets"]
    write_safetensors(path, header, raw[8 + length :])
    assert convert_hf.main(["--hf-dir", str(copy), "--out", str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: tensors '{seventh}' and '{eighth}' overlap") and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["src"]


@pytest.mark.parametrize(("text", "message"), [("[1, 2]", "a JSON list, not an object"), ("{oops", "not valid JSON")])
def test_a_config_that_is_not_a_json_object_is_named(source, tmp_path, capsys, text, message):
    copy = shutil.copytree(source, tmp_path / "src")
    (copy / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=f"{copy / 'config.json'}: {message}"):
        ModelConfig.from_hf(copy)
    assert convert_hf.main(["--hf-dir", str(copy), "--out", str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {copy / 'config.json'}: {message}") and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_expert_means_are_carried_over(source, converted):
    """`--compensation mean` reads expert_means.npz beside the checkpoint, CAEE importance.npz; the converted copy
    keeps both."""
    name = expert_means.FILENAME
    with open(os.path.join(source, name), "rb") as a, open(os.path.join(converted, name), "rb") as b:
        assert a.read() == b.read()
    carried = expert_means.read(os.path.join(converted, name), ModelConfig.from_hf(converted))
    assert carried.tokens == 10 and carried.means.shape == (2, 16, 48)
    weights = importance.read(os.path.join(converted, importance.FILENAME), ModelConfig.from_hf(converted))
    assert weights.expert_scale.shape == (2, 16)
