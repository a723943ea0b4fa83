"""checkpoints_tools.convert_hf: DeepSeek-layout FP8 checkpoints -> Orbax, restored onto any mesh.

The source is a tiny transformers DeepseekV3 saved with `save_pretrained`, given one MTP module (which
transformers does not save) and quantised into DeepSeek's released layout (FP8 + weight_scale_inv, three
shards with an index).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import make_hf_model, random_tokens
from flax import nnx
from safetensors.numpy import load_file, save_file

import caee_jax
from caee_jax.api import BUNDLED_MODEL, Model
from caee_jax.config import ModelConfig
from caee_jax.parallel.mesh import make_mesh
from caee_jax.parallel.rules import state_shardings
from caee_jax.weights.fp8 import FP8_DTYPE, dequantize
from caee_jax.weights.hf_layout import hf_shape, mtp_recipes
from caee_jax.weights.orbax_checkpoint import restore_model, restore_unit, units
from caee_jax.weights.safetensors_io import INDEX_NAME, CheckpointError, SafetensorsFile
from checkpoints_tools import convert_hf
from checkpoints_tools.fp8_checkpoint import quantize, write_release_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MTP = "model.layers.3."  # TINY_HF has 3 layers; transformers' config defaults num_nextn_predict_layers to 1


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(FP8 directory, transformers reference model, the float32 HF tensors it was quantised from, the
    transformers float32 directory without MTP)."""
    root = tmp_path_factory.mktemp("release")
    reference = make_hf_model(seed=11)
    reference.save_pretrained(root / "hf")
    tensors = load_file(root / "hf" / "model.safetensors")
    with open(root / "hf" / "config.json") as f:
        raw_config = json.load(f)
    config = ModelConfig.from_hf(raw_config)
    assert config.num_nextn_predict_layers == 1
    rng = np.random.default_rng(0)
    for name in sorted({n for recipe in mtp_recipes(config, 0) for n in recipe.sources}):
        shape = hf_shape(name, config)
        scale, offset = (0.1, 1.0) if len(shape) == 1 else (0.02, 0.0)
        tensors[name] = (offset + scale * rng.standard_normal(shape)).astype(np.float32)
    directory = str(root / "fp8")
    write_release_checkpoint(directory, tensors, raw_config, num_shards=3)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(BUNDLED_MODEL, name), directory)
    return directory, reference, tensors, str(root / "hf")


def quiet(_message: str) -> None:
    pass


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("converted") / "out")
    convert_hf.convert(release[0], out, "float32", progress=False, log=quiet)
    return out


def test_converted_logits_equal_the_direct_fp8_load(release, converted, tmp_path):
    fp8_dir, reference, _, _ = release
    tokens = random_tokens(131, (2, 9), seed=3)
    direct = np.asarray(caee_jax.load(fp8_dir, dtype="float32")(tokens))
    np.testing.assert_array_equal(np.asarray(caee_jax.load(converted)(tokens)), direct)
    with torch.no_grad():
        original = reference(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    assert np.abs(direct - original).max() < 0.05 * np.abs(original).max()  # FP8 quantisation error only

    out = str(tmp_path / "bf16")
    convert_hf.convert(fp8_dir, out, "bfloat16", progress=False, log=quiet)
    loaded = caee_jax.load(out)  # the stored dtype by default
    assert loaded.dtype == ml_dtypes.bfloat16
    direct_bf16 = np.asarray(caee_jax.load(fp8_dir, dtype="bfloat16")(tokens))
    np.testing.assert_array_equal(np.asarray(loaded(tokens)), direct_bf16)
    # a float32 conversion restored as bfloat16 (cast on read) rounds like the direct bfloat16 load
    np.testing.assert_array_equal(np.asarray(caee_jax.load(converted, dtype="bfloat16")(tokens)), direct_bf16)


def test_unquantised_checkpoint_converts_exactly(release, tmp_path):
    """transformers' float32 save_pretrained output (no FP8, no MTP tensors although its config asks for one)."""
    hf_dir = release[3]
    out = str(tmp_path / "out")
    messages = []
    convert_hf.convert(hf_dir, out, "float32", progress=False, log=messages.append)
    assert any("has no MTP tensors" in m for m in messages)
    tokens = random_tokens(131, (2, 9), seed=4)
    np.testing.assert_array_equal(np.asarray(caee_jax.load(out)(tokens)), np.asarray(caee_jax.load(hf_dir)(tokens)))
    assert caee_jax.load_mtp(out) == []


@pytest.mark.parametrize("spec", ["data=2,expert=4", "expert=8"])
def test_restores_straight_onto_a_mesh(converted, spec):
    """Every parameter comes back with its target sharding, and Model keeps those arrays (no host copy)."""
    mesh = make_mesh(spec)
    config = ModelConfig.from_hf(converted)
    module = restore_model(converted, config, np.float32, mesh)
    state = nnx.state(module)
    for (path, variable), (_, sharding) in zip(
        nnx.to_flat_state(state), nnx.to_flat_state(state_shardings(state, mesh)), strict=True
    ):
        assert variable.get_value().sharding == sharding.get_value(), path
    model = Model(module, mesh=mesh)
    for restored, kept in zip(jax.tree.leaves(state), jax.tree.leaves(model.state), strict=True):
        assert kept is restored
    tokens = random_tokens(131, (2, 9), seed=3)
    np.testing.assert_allclose(
        np.asarray(model(tokens)), np.asarray(caee_jax.load(converted)(tokens)), atol=1e-5, rtol=0
    )


def test_mtp_module_is_kept_and_loads_onto_a_mesh(release, converted):
    tensors = release[2]
    (mtp,) = caee_jax.load_mtp(converted)
    bf16 = lambda name: tensors[name].astype(ml_dtypes.bfloat16).astype(np.float32)  # noqa: E731
    np.testing.assert_array_equal(np.asarray(mtp.eh_proj[...]), bf16(MTP + "eh_proj.weight").T)
    np.testing.assert_array_equal(np.asarray(mtp.enorm.weight[...]), bf16(MTP + "enorm.weight"))
    np.testing.assert_array_equal(np.asarray(mtp.head[...]), bf16(MTP + "shared_head.head.weight").T)
    expert = MTP + "mlp.experts.5.gate_proj.weight"
    np.testing.assert_array_equal(np.asarray(mtp.layer.ffn.gate_proj[...])[5], dequantize(*quantize(tensors[expert])).T)
    (on_mesh,) = caee_jax.load_mtp(converted, mesh=make_mesh("expert=8"))
    assert on_mesh.layer.ffn.gate_proj[...].sharding.spec[0] == "expert"
    np.testing.assert_array_equal(
        np.asarray(on_mesh.layer.ffn.gate_proj[...]), np.asarray(mtp.layer.ffn.gate_proj[...])
    )


def test_output_layout_and_side_files(release, converted):
    fp8_dir = release[0]
    assert sorted(os.listdir(converted)) == [
        "caee_checkpoint.json",
        "config.json",
        "dense_layers",
        "moe_layers",
        "mtp",
        "tokenizer.json",
        "tokenizer_config.json",
        "top",
    ]
    with open(os.path.join(fp8_dir, "config.json")) as f:
        source_config = json.load(f)
    with open(os.path.join(converted, "config.json")) as f:
        assert json.load(f) == {k: v for k, v in source_config.items() if k != "quantization_config"}
    with (
        open(os.path.join(converted, "tokenizer.json"), "rb") as a,
        open(os.path.join(fp8_dir, "tokenizer.json"), "rb") as b,
    ):
        assert a.read() == b.read()
    with open(os.path.join(converted, "caee_checkpoint.json")) as f:
        metadata = json.load(f)
    assert metadata["units"] == ["top", "dense_layers/000", "moe_layers/000", "moe_layers/001", "mtp/000"]
    assert metadata["dtype"] == "float32" and metadata["mtp_modules"] == 1
    assert not os.path.exists(converted + ".partial")


def test_verify_passes_then_catches_a_changed_source(release, converted, tmp_path, capsys):
    fp8_dir = release[0]
    args = ["--hf-dir", fp8_dir, "--out", converted, "--verify", "--verify-samples", "1000"]
    assert convert_hf.main(args) == 0
    assert "verify: all" in capsys.readouterr().err
    changed = shutil.copytree(fp8_dir, tmp_path / "changed")
    rewrite(changed, "model.norm.weight", lambda t: t.update({"model.norm.weight": t["model.norm.weight"] * 2}))
    assert convert_hf.main(["--hf-dir", str(changed), *args[2:]]) == 2
    assert "MISMATCH top/final_norm.weight" in capsys.readouterr().err


def test_an_existing_destination_is_never_overwritten(release, converted, tmp_path, capsys):
    assert convert_hf.main(["--hf-dir", release[0], "--out", converted, "--no-progress"]) == 1
    assert "already a complete conversion" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert convert_hf.main(["--hf-dir", release[0], "--out", str(other), "--no-progress"]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (other / "keep.txt").read_text() == "mine"


def shard_of(directory, name: str) -> str:
    with open(os.path.join(directory, INDEX_NAME)) as f:
        return os.path.join(directory, json.load(f)["weight_map"][name])


def rewrite(directory, name: str, change) -> None:
    """Rewrites the shard holding `name` after change(tensors) (and the index, for added/removed tensors)."""
    path = shard_of(directory, name)
    file = SafetensorsFile(path)
    tensors = {n: file.read(n) for n in file.keys()}
    change(tensors)
    save_file(tensors, path)
    index_path = os.path.join(directory, INDEX_NAME)
    with open(index_path) as f:
        index = json.load(f)
    weight_map = {n: s for n, s in index["weight_map"].items() if s != os.path.basename(path) or n in tensors}
    weight_map.update({n: os.path.basename(path) for n in tensors})
    with open(index_path, "w") as f:
        json.dump({**index, "weight_map": weight_map}, f)


def truncate(directory, name):
    path = shard_of(directory, name)
    os.truncate(path, os.path.getsize(path) - 100)


def corrupt_header(directory, name):
    with open(shard_of(directory, name), "r+b") as f:
        f.seek(8)
        f.write(b"\xff\xfe garbage")


EXPERT = "model.layers.2.mlp.experts.5.up_proj.weight"
NORM = "model.layers.1.self_attn.kv_a_layernorm.weight"
O_PROJ = "model.layers.1.self_attn.o_proj.weight"
ROUTER = "model.layers.2.mlp.gate.weight"
BAD_INPUTS = {
    "missing tensor": (
        lambda d: rewrite(d, EXPERT, lambda t: (t.pop(EXPERT), t.pop(EXPERT + "_scale_inv"))),
        f"model.safetensors.index.json: missing tensor '{EXPERT}'",
    ),
    "unexpected tensor": (
        lambda d: rewrite(d, NORM, lambda t: t.update({"model.layers.1.mlp.extra.weight": np.ones(3, np.float32)})),
        r"model-0000\d-of-00003.safetensors: unexpected tensor 'model.layers.1.mlp.extra.weight'",
    ),
    "shape mismatch": (
        lambda d: rewrite(d, NORM, lambda t: t.update({NORM: t[NORM][:-1]})),
        rf"model-0000\d-of-00003.safetensors: tensor '{NORM}' has shape \(23,\), expected \(24,\)",
    ),
    "dtype mismatch": (
        lambda d: rewrite(d, NORM, lambda t: t.update({NORM: np.ones(24, np.int32)})),
        rf"model-0000\d-of-00003.safetensors: tensor '{NORM}' has dtype int32",
    ),
    "fp8 where the release has none": (
        lambda d: rewrite(d, ROUTER, lambda t: t.update({ROUTER: t[ROUTER].astype(FP8_DTYPE)})),
        rf"model-0000\d-of-00003.safetensors: tensor '{ROUTER}' has dtype float8_e4m3fn",
    ),
    "fp8 without its scale": (
        lambda d: rewrite(d, O_PROJ, lambda t: t.pop(O_PROJ + "_scale_inv")),
        rf"model-0000\d-of-00003.safetensors: FP8 tensor '{O_PROJ}' has no scale '{O_PROJ}_scale_inv'",
    ),
    "scale of the wrong shape": (
        lambda d: rewrite(d, O_PROJ, lambda t: t.update({O_PROJ + "_scale_inv": np.ones((2, 1), np.float32)})),
        rf"model-0000\d-of-00003.safetensors: tensor '{O_PROJ}_scale_inv' has shape \(2, 1\), expected \(1, 1\)",
    ),
    "truncated shard": (lambda d: truncate(d, EXPERT), r"model-0000\d-of-00003.safetensors: truncated: tensor '"),
    "corrupted header": (
        lambda d: corrupt_header(d, EXPERT),
        r"model-0000\d-of-00003.safetensors: corrupted safetensors header",
    ),
    "index points at a missing shard": (
        lambda d: os.remove(shard_of(d, EXPERT)),
        r"model.safetensors.index.json: points at missing shard .*model-0000\d-of-00003.safetensors \(for tensor '",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_named_and_nothing_is_written(release, tmp_path, capsys, case):
    damage, message = BAD_INPUTS[case]
    source = shutil.copytree(release[0], tmp_path / "src")
    damage(str(source))
    out = tmp_path / "out"
    assert convert_hf.main(["--hf-dir", str(source), "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(re.findall(message, err)) == 1, err
    assert sorted(os.listdir(tmp_path)) == ["src"]  # neither DST nor DST.partial


KILLED_RUN = """
import sys, time
from checkpoints_tools import convert_hf
save, count = convert_hf.save_unit, 0
def save_then_stall(path, values):
    global count
    save(path, values)
    count += 1
    if count == 3:  # the third unit is on disk, its completion marker is not
        open(sys.argv[3], "w").close()
        time.sleep(600)
convert_hf.save_unit = save_then_stall
convert_hf.main(["--hf-dir", sys.argv[1], "--out", sys.argv[2], "--dtype", "float32", "--no-progress"])
"""


def files_of(directory: str) -> dict[str, tuple[int, int]]:
    """relative path -> (inode, mtime in ns) of every file under `directory`."""
    out = {}
    for root, _, names in os.walk(directory):
        for name in names:
            stat = os.stat(os.path.join(root, name))
            out[os.path.relpath(os.path.join(root, name), directory)] = (stat.st_ino, stat.st_mtime_ns)
    return out


def test_killed_conversion_resumes_without_redoing_finished_units(release, converted, tmp_path):
    fp8_dir = release[0]
    out, stalled = str(tmp_path / "out"), str(tmp_path / "stalled")
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen([sys.executable, "-c", KILLED_RUN, fp8_dir, out, stalled], cwd=REPO, env=env)
    deadline = time.monotonic() + 120
    while not os.path.exists(stalled):
        assert process.poll() is None and time.monotonic() < deadline, "the conversion ended before stalling"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()

    partial = out + ".partial"
    assert not os.path.exists(out)
    assert sorted(os.listdir(os.path.join(partial, ".done"))) == ["dense_layers.000", "top"]
    assert os.path.isdir(os.path.join(partial, "moe_layers", "000"))  # written, but not marked complete
    finished = {unit: files_of(os.path.join(partial, unit)) for unit in ("top", "dense_layers/000")}
    with pytest.raises(convert_hf.ConversionError, match="another source or dtype"):
        convert_hf.convert(fp8_dir, out, "bfloat16", progress=False, log=quiet)

    messages = []
    summary = convert_hf.convert(fp8_dir, out, "float32", progress=False, log=messages.append)
    assert (summary["skipped"], summary["written"]) == (2, 3)
    assert "resumed: 2 of 5 units were already converted" in messages
    for unit, files in finished.items():
        assert files_of(os.path.join(out, unit)) == files  # same files, untouched
    assert not os.path.exists(partial)
    config = ModelConfig.from_hf(out)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    for unit in units(config, np.float32, 1):
        targets = {p: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device) for p, a in unit.abstract.items()}
        resumed = restore_unit(os.path.join(out, unit.name), targets)
        uninterrupted = restore_unit(os.path.join(converted, unit.name), targets)
        for path in targets:
            np.testing.assert_array_equal(np.asarray(resumed[path]), np.asarray(uninterrupted[path]), err_msg=unit.name)


def test_expert_store_from_a_converted_checkpoint_equals_the_loaded_experts(release, converted, tmp_path, capsys):
    """The store streamed from the Orbax items (one layer at a time) holds the loaded model's experts bit for
    bit, in the stored dtype or another; the converter writes the same store with --expert-store."""
    from caee_jax.offload.disk_store import DiskStore
    from caee_jax.offload.store import HostStore
    from checkpoints_tools import expert_store

    for dtype in ("float32", "bfloat16"):
        model = caee_jax.load(converted, dtype=dtype)
        out = str(tmp_path / dtype)
        assert expert_store.main(["--model", converted, "--out", out, "--dtype", dtype, "--no-progress"]) == 0
        host = HostStore.from_state(model.config, model.state)
        with DiskStore(out, model.config, model.dtype) as disk:
            for layer, expert in ((0, 0), (1, 15), (1, 6)):
                for got, want in zip(disk.read(layer, expert), host.read(layer, expert), strict=True):
                    np.testing.assert_array_equal(np.asarray(got).view(np.uint8), np.asarray(want).view(np.uint8))
    args = ["--hf-dir", release[0], "--out", str(tmp_path / "again"), "--dtype", "float32", "--no-progress"]
    assert convert_hf.main([*args, "--expert-store", str(tmp_path / "store")]) == 0
    with open(tmp_path / "store" / "manifest.json") as f, open(tmp_path / "float32" / "manifest.json") as g:
        assert json.load(f)["fingerprint"] == json.load(g)["fingerprint"]
    capsys.readouterr()


def test_keep_fp8_stores_the_release_experts_unchanged(release, tmp_path):
    """--keep-fp8: the routed experts restore as the release's FP8 bytes and block scales (transposed), the
    model computes exactly what the FP8 HF directory loaded with weights="fp8" computes, --verify passes."""
    fp8_dir, _, tensors, hf_dir = release
    out = str(tmp_path / "kept")
    convert_hf.convert(fp8_dir, out, "float32", progress=False, log=quiet, keep_fp8=True)
    kept, direct = caee_jax.load(out), caee_jax.load(fp8_dir, weights="fp8")
    assert kept.weights == direct.weights == "fp8"
    ffn = kept.module.moe_layers.ffn
    quantized, scale = quantize(tensors["model.layers.1.mlp.experts.5.up_proj.weight"])  # MoE stack index 0
    np.testing.assert_array_equal(np.asarray(ffn.up_proj[...])[0, 5].view(np.uint8), quantized.T.view(np.uint8))
    np.testing.assert_array_equal(np.asarray(ffn.up_scale[...])[0, 5], scale.T)
    tokens = random_tokens(131, (2, 9), seed=3)
    np.testing.assert_array_equal(np.asarray(kept(tokens)), np.asarray(direct(tokens)))
    assert convert_hf.verify(fp8_dir, out, samples=4, log=quiet)
    with pytest.raises(CheckpointError, match=r"experts\.0\.gate_proj\.weight' is float32; --keep-fp8 needs FP8"):
        convert_hf.convert(hf_dir, str(tmp_path / "not-fp8"), progress=False, log=quiet, keep_fp8=True)
    assert not os.path.exists(tmp_path / "not-fp8")


def test_keep_fp8_cannot_feed_an_expert_store(release, tmp_path, capsys):
    args = ["--hf-dir", release[0], "--out", str(tmp_path / "o"), "--keep-fp8", "--expert-store", str(tmp_path / "s")]
    assert convert_hf.main(args) == 2
    assert "cannot be written from --keep-fp8" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")
