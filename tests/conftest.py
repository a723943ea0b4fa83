"""Shared fixtures: tiny random transformers DeepseekV3 checkpoints (the parity reference)."""

from __future__ import annotations

import contextlib
import fcntl
import gc
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest

# Eight simulated CPU devices for the mesh tests; set before any test touches a device.
NUM_DEVICES = 8
jax.config.update("jax_num_cpu_devices", NUM_DEVICES)

REFERENCE_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference", "deepseek-r1")

# A small DeepseekV3 with every feature on; tests override fields. Sizes are odd/prime where the
# architecture allows, so a transposed or mis-split tensor cannot go unnoticed.
TINY_HF = dict(
    vocab_size=131,
    hidden_size=48,
    intermediate_size=72,
    moe_intermediate_size=20,
    num_hidden_layers=3,
    num_attention_heads=3,
    num_key_value_heads=3,
    n_shared_experts=1,
    n_routed_experts=16,
    num_experts_per_tok=4,
    n_group=4,
    topk_group=2,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    first_k_dense_replace=1,
    kv_lora_rank=24,
    q_lora_rank=40,
    qk_nope_head_dim=12,
    qk_rope_head_dim=8,
    v_head_dim=10,
    max_position_embeddings=256,
    rope_parameters={
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 64,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
)


def make_hf_model(seed: int = 0, **overrides):
    """A random transformers DeepseekV3ForCausalLM (float32, eval mode).

    Norm weights and the router's e_score_correction_bias are randomised too (transformers initialises
    them to ones / zeros, which would hide a missing or misplaced tensor).
    """
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    config = DeepseekV3Config(**{**TINY_HF, **overrides})
    model = DeepseekV3ForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                tensor.copy_(1 + 0.1 * torch.randn(tensor.shape, generator=generator))
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.05 * torch.randn(buffer.shape, generator=generator))
    return model


def save_hf_model(model, directory) -> str:
    model.save_pretrained(directory)
    return str(directory)


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Factory: hf_checkpoint(seed=0, **config_overrides) -> (directory, transformers model)."""

    def make(seed: int = 0, **overrides):
        model = make_hf_model(seed, **overrides)
        directory = save_hf_model(model, tmp_path / f"hf-{seed}-{len(os.listdir(tmp_path))}")
        return directory, model

    return make


def random_tokens(vocab: int, shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, shape, dtype=np.int32)


@pytest.fixture
def tiny_means(tmp_path) -> str:
    """An expert-means file of the "tiny" preset (seed 0, the launchers' model), calibrated on random tokens."""
    from caee_jax import init_random
    from caee_jax.caee import expert_means
    from caee_jax.calibration.expert_means import calibrate

    model = init_random("tiny")
    tokens = random_tokens(model.config.vocab_size, (64,), seed=2)
    path = str(tmp_path / "tiny_means.npz")
    expert_means.save(path, calibrate(model, tokens, tokens=64, seq_len=8, batch_size=4, progress=False), model.config)
    return path


@contextlib.contextmanager
def compile_counter():
    """Records XLA compilations inside the block: `with compile_counter() as compiles: ...`, then len(compiles)."""
    compiles = []

    def listener(event, duration, **kwargs):
        if "backend_compile" in event:
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drops every compiled executable after each test module. The whole suite in one process otherwise
    keeps thousands of them: at about 600 tests XLA aborted inside a compile, with no message, most likely
    at the kernel's limit of 65530 memory mappings per process (with this fixture a module leaves 1-5k)."""
    yield
    jax.clear_caches()
    gc.collect()


def built_once(tmp_path_factory, name: str, build) -> pathlib.Path:
    """Directory `name`, filled by `build(directory)` once per test session, however many pytest-xdist workers
    ask (each worker's base temporary directory is inside the session's; the first to take the lock builds,
    the others wait for it and reuse its directory)."""
    root = tmp_path_factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root
    directory, built = root / name, root / f"{name}.built"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not built.exists():
            shutil.rmtree(directory, ignore_errors=True)  # a build that failed in another worker
            directory.mkdir()
            build(directory)
            built.touch()
    return directory
