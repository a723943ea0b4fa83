"""caee_jax.load on HF directories: sharded checkpoints, tokenizers, and clear errors for bad input."""

from __future__ import annotations

import gzip
import json
import os
import shutil

import numpy as np
import pytest
from conftest import REFERENCE_DIR, random_tokens
from safetensors.numpy import load_file, save_file

import caee_jax
from caee_jax.runtime.tokenizer import Tokenizer
from caee_jax.weights.safetensors_io import CheckpointError


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from conftest import make_hf_model

    reference = make_hf_model(seed=21)
    directory = tmp_path_factory.mktemp("ckpt")
    reference.save_pretrained(directory)
    return str(directory)


def copy_of(checkpoint, tmp_path) -> str:
    target = tmp_path / "copy"
    shutil.copytree(checkpoint, target)
    return str(target)


def test_sharded_index_loads_identically(checkpoint, tmp_path):
    """Split the single file into three shards with a model.safetensors.index.json."""
    tensors = load_file(os.path.join(checkpoint, "model.safetensors"))
    names = sorted(tensors)
    sharded = tmp_path / "sharded"
    shutil.copytree(checkpoint, sharded, ignore=shutil.ignore_patterns("*.safetensors"))
    weight_map = {}
    for i, part in enumerate(np.array_split(np.array(names), 3)):
        shard = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file({n: tensors[n] for n in part}, sharded / shard)
        weight_map.update({n: shard for n in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    tokens = random_tokens(131, (1, 7))
    np.testing.assert_array_equal(
        np.asarray(caee_jax.load(sharded)(tokens)), np.asarray(caee_jax.load(checkpoint)(tokens))
    )


def rewrite(directory, change):
    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def test_missing_tensor_is_named(checkpoint, tmp_path):
    directory = copy_of(checkpoint, tmp_path)
    rewrite(directory, lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.2.mlp.experts.5.up_proj.weight'"):
        caee_jax.load(directory)


def test_unexpected_tensor_is_named(checkpoint, tmp_path):
    directory = copy_of(checkpoint, tmp_path)
    rewrite(directory, lambda t: t.update({"model.layers.0.mlp.extra.weight": np.zeros((2, 2), np.float32)}))
    with pytest.raises(CheckpointError, match="model.safetensors: unexpected tensor 'model.layers.0.mlp.extra.weight'"):
        caee_jax.load(directory)


def test_shape_mismatch_is_named(checkpoint, tmp_path):
    directory = copy_of(checkpoint, tmp_path)
    name = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"
    rewrite(directory, lambda t: t.update({name: t[name][:-1]}))
    with pytest.raises(
        CheckpointError, match=f"model.safetensors: tensor '{name}' has shape \\(31, 48\\), expected \\(32, 48\\)"
    ):
        caee_jax.load(directory)


def test_truncated_file_is_named(checkpoint, tmp_path):
    directory = copy_of(checkpoint, tmp_path)
    path = os.path.join(directory, "model.safetensors")
    os.truncate(path, os.path.getsize(path) - 100)
    with pytest.raises(CheckpointError, match="model.safetensors: truncated: tensor"):
        caee_jax.load(directory)


def test_corrupted_header_is_named(checkpoint, tmp_path):
    directory = copy_of(checkpoint, tmp_path)
    path = os.path.join(directory, "model.safetensors")
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"\xff\xfe garbage")
    with pytest.raises(CheckpointError, match="model.safetensors: corrupted safetensors header"):
        caee_jax.load(directory)


def test_index_pointing_at_missing_shard(checkpoint, tmp_path):
    directory = copy_of(checkpoint, tmp_path)
    names = load_file(os.path.join(directory, "model.safetensors")).keys()
    weight_map = {n: "model.safetensors" for n in names}
    weight_map["lm_head.weight"] = "model-00002-of-00002.safetensors"
    index = os.path.join(directory, "model.safetensors.index.json")
    with open(index, "w") as f:
        json.dump({"weight_map": weight_map}, f)
    with pytest.raises(CheckpointError, match="points at missing shard .*model-00002-of-00002"):
        caee_jax.load(directory)


def test_not_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        caee_jax.load(tmp_path / "absent")
    with pytest.raises(ValueError, match="dtype 'float16'"):
        caee_jax.load(tmp_path, dtype="float16")


R1_TOKENIZER = os.path.join(REFERENCE_DIR, "tokenizer.json.gz")


@pytest.mark.skipif(not os.path.exists(R1_TOKENIZER), reason="../shared/reference absent")
def test_r1_tokenizer_round_trips_and_loads_with_the_checkpoint(checkpoint, tmp_path):
    directory = copy_of(checkpoint, tmp_path)
    with gzip.open(R1_TOKENIZER) as src, open(os.path.join(directory, "tokenizer.json"), "wb") as dst:
        shutil.copyfileobj(src, dst)
    shutil.copy(os.path.join(REFERENCE_DIR, "tokenizer_config.json"), directory)
    tokenizer = Tokenizer.from_dir(directory)
    text = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # ünïcödé 数字"
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_id == 0  # R1 prepends <｜begin▁of▁sentence｜>
    assert tokenizer.decode(ids) == text
    assert tokenizer.vocab_size > 128000
    model = caee_jax.load(directory)
    assert model.tokenizer is not None and model.tokenizer.encode(text) == ids
