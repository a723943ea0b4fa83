"""launch/plan.py and the memory plan: per-device bytes from the sharded abstract model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from caee_jax.config import preset
from caee_jax.memory_plan import plan_memory
from caee_jax.parallel.mesh import make_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAN = [sys.executable, os.path.join(ROOT, "launch", "plan.py")]
R1_PARAMS = 671_026_419_200  # without the MTP layer (see test_config)


def test_r1_671b_on_64_simulated_devices():
    args = ["--preset", "deepseek-r1-671b", "--mesh", "data=2,expert=32", "--batch", "64", "--context", "8192"]
    result = subprocess.run(PLAN + args + ["--json"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    plan = json.loads(result.stdout)
    assert plan["total_params"] == R1_PARAMS
    assert plan["mesh"] == "data=2,expert=32,tensor=1"
    devices = plan["devices"]
    assert len(devices) == 64 and len({d["total_bytes"] for d in devices}) == 1
    config = preset("deepseek-r1-671b")
    expert_params = 3 * config.num_moe_layers * config.n_routed_experts * config.hidden_size
    expert_params *= config.moe_intermediate_size
    assert devices[0]["expert_param_bytes"] == 2 * expert_params // 32  # bf16, experts split 32 ways
    cache_values = config.num_hidden_layers * 64 * 8192 * config.latent_dim
    assert devices[0]["cache_bytes"] == 2 * cache_values // 2  # batch split over data=2
    assert plan["fits"] == (plan["max_device_bytes"] <= plan["device_memory_bytes"])


def test_a_mesh_the_experts_do_not_divide_is_refused():
    result = subprocess.run(PLAN + ["--mesh", "expert=7"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 2
    assert "'experts' of size 256 does not divide mesh axis 'expert' of size 7" in result.stderr


def test_per_device_bytes_add_up_to_the_model_and_its_replicas():
    config = preset("tiny")
    plan = plan_memory(
        config, make_mesh("data=2,expert=4"), dtype=jnp.float32, batch=4, context=32, device_memory_bytes=1 << 20
    )
    assert len(plan.devices) == jax.device_count()
    experts = sum(d.expert_param_bytes for d in plan.devices)
    e, d, f = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
    assert experts == 2 * 4 * (3 * config.num_moe_layers * e * d * f)  # 2 data replicas, f32
    others = {dev.param_bytes - dev.expert_param_bytes for dev in plan.devices}
    assert len(others) == 1  # everything else replicated on every device
    assert others.pop() == 4 * plan.total_params - 4 * 3 * config.num_moe_layers * e * d * f
    cache = sum(dev.cache_bytes for dev in plan.devices)
    assert cache == 4 * config.num_hidden_layers * 4 * 32 * config.latent_dim * 4  # replicated over 4 expert shards
    assert plan.fits == (np.max([dev.total_bytes for dev in plan.devices]) <= 1 << 20)


def test_r1_671b_with_fp8_experts_fits_one_node_of_8_h200():
    """The release's storage (FP8 e4m3 routed experts + float32 128x128 block scales, the rest bf16) on 8
    devices of 141 GiB at batch 16 x 4096 context; bf16 experts do not fit there."""
    args = ["--mesh", "expert=8", "--device-memory-gib", "141", "--batch", "16", "--context", "4096", "--json"]
    plans = {}
    for weights in ("fp8", "bf16"):
        result = subprocess.run(
            PLAN + args + ["--weights", weights], capture_output=True, text=True, timeout=300, cwd=ROOT
        )
        assert result.returncode == 0, result.stderr[-2000:]
        plans[weights] = json.loads(result.stdout)
    fp8, bf16 = plans["fp8"], plans["bf16"]
    assert fp8["weights"] == "fp8" and fp8["fits"] and not bf16["fits"]
    config = preset("deepseek-r1-671b")
    layers, e, d, f = config.num_moe_layers, config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
    scales = 3 * layers * e * -(-d // 128) * -(-f // 128)
    assert fp8["total_params"] == R1_PARAMS + scales
    device = fp8["devices"][0]
    assert device["expert_param_bytes"] == (3 * layers * e * d * f + 4 * scales) // 8  # 1 byte + f32 scales
    assert bf16["devices"][0]["param_bytes"] - device["param_bytes"] == (3 * layers * e * d * f - 4 * scales) // 8


def test_data_expert_splits_the_cache_over_the_expert_devices():
    """data=2,data_expert=4: the experts split 4 ways as on data=2,expert=4, the cache 8 ways (no replica)."""
    config = preset("tiny")
    plan = plan_memory(
        config, make_mesh("data=2,data_expert=4"), dtype=jnp.float32, batch=8, context=32, device_memory_bytes=1 << 20
    )
    e, d, f = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
    assert {dev.expert_param_bytes for dev in plan.devices} == {4 * 3 * config.num_moe_layers * e * d * f // 4}
    per_device = 4 * config.num_hidden_layers * 8 * 32 * config.latent_dim // 8
    assert {dev.cache_bytes for dev in plan.devices} == {per_device}
