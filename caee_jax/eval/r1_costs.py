"""Cost tables for DeepSeek-R1's routed experts on devices we do not have: assumptions, not measurements.

Two sources, each labelled wherever its numbers are shown (`DeviceModel.source`):
- `scaled_cpu`: this machine's calibrated table (bundled model, d = f = 256, float32, `loop` backend)
  scaled to R1's expert (d = 7168, f = 2048, bf16): reading an expert's weights by the bytes ratio (112x),
  a computed row by the FLOP ratio (224x), per-token communication by the bytes of a hidden vector (14x);
  the fixed per-layer cost unchanged. Prices the `loop` backend (whole row tiles).
- `from_specs`: published datasheet figures (HBM bandwidth, dense FP8 tensor throughput, a per-GPU
  network link); FP8 expert weights as released. An active expert costs its bytes / HBM bandwidth; a
  routed pair its FLOPs / throughput plus its all-to-all bytes (FP8 dispatch + bf16 combine of one hidden
  vector) / link bandwidth, charged to the device that runs it; a fixed cost per layer (launches,
  gate, collective latency). Every pair counts (row tile 1, as the `pallas` backend).
Letters: P physical expert slots, D devices.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from caee_jax.caee.cost_table import CostTable, DeviceCosts, FitQuality, MeshSignature
from caee_jax.routing.backend import ExpertBackend

R1_HIDDEN, R1_WIDTH, R1_EXPERTS, R1_TOP_K, R1_GROUPS = 7168, 2048, 256, 8, 8
EXPERT_PARAMS = 3 * R1_HIDDEN * R1_WIDTH  # gate, up [D, F] and down [F, D]
PAIR_FLOPS = 2 * EXPERT_PARAMS  # one token through one SwiGLU expert
BF16_BYTES, FP8_BYTES = 2, 1


@dataclasses.dataclass(frozen=True)
class DeviceModel:
    """One device's R1 expert costs, seconds (see cost_table.DeviceCosts); source: how they were obtained."""

    name: str
    fixed_s: float
    pair_s: float
    activation_s: float
    comm_token_s: float
    backend: ExpertBackend
    dtype: str
    source: str


def scaled_cpu(table: CostTable, name: str = "cpu-scaled") -> DeviceModel:
    """`table` (a calibrated CPU table of a smaller model, float32) scaled to R1's expert in bf16; the
    devices' mean costs (an ideal, identical device per shard)."""
    sig = table.signature
    small_params = 3 * sig.hidden_size * sig.moe_intermediate_size
    small_bytes = np.dtype(sig.dtype).itemsize
    bytes_ratio = EXPERT_PARAMS * BF16_BYTES / (small_params * small_bytes)
    flops_ratio = EXPERT_PARAMS / small_params
    token_ratio = R1_HIDDEN * BF16_BYTES / (sig.hidden_size * small_bytes)

    def mean(field: str) -> float:
        return float(np.mean([getattr(d, field) for d in table.devices]))

    return DeviceModel(
        name=name,
        fixed_s=mean("fixed_s"),
        pair_s=mean("pair_s") * flops_ratio,
        activation_s=mean("activation_s") * bytes_ratio,
        comm_token_s=mean("comm_token_s") * token_ratio,
        backend=table.backend,
        dtype="bfloat16",
        source=(
            f"this CPU's {sig.num_processes}-process table ({sig.slug()}) scaled to R1: per expert x{bytes_ratio:.0f} "
            f"(bytes), per row x{flops_ratio:.0f} (FLOPs), per token x{token_ratio:.0f} (bytes), fixed x1"
        ),
    )


def from_specs(
    name: str, hbm_bytes_s: float, flops_s: float, link_bytes_s: float, fixed_s: float = 20e-6
) -> DeviceModel:
    """R1 with FP8 experts on a device with these datasheet figures (bytes/s, FLOP/s, bytes/s per device)."""
    pair_bytes = R1_HIDDEN * FP8_BYTES + R1_HIDDEN * BF16_BYTES  # FP8 dispatch, bf16 combine
    return DeviceModel(
        name=name,
        fixed_s=fixed_s,
        pair_s=PAIR_FLOPS / flops_s + pair_bytes / link_bytes_s,
        activation_s=EXPERT_PARAMS * FP8_BYTES / hbm_bytes_s,
        comm_token_s=0.0,
        backend=ExpertBackend.PALLAS,
        dtype="float8_e4m3fn",
        source=(
            f"datasheet: HBM {hbm_bytes_s / 1e12:.2f} TB/s, FP8 dense {flops_s / 1e12:.0f} TFLOP/s, "
            f"link {link_bytes_s / 1e9:.0f} GB/s per GPU, fixed {fixed_s * 1e6:.0f} us per layer; FP8 experts"
        ),
    )


# Datasheet figures (NVIDIA H100 SXM5 and H200 SXM: HBM3 3.35 TB/s, HBM3e 4.8 TB/s, FP8 dense 1979 TFLOP/s);
# one 400 Gb/s InfiniBand NIC per GPU (50 GB/s) for the all-to-all.
H100 = from_specs("H100", hbm_bytes_s=3.35e12, flops_s=1979e12, link_bytes_s=50e9)
H200 = from_specs("H200", hbm_bytes_s=4.8e12, flops_s=1979e12, link_bytes_s=50e9)


def r1_table(device: DeviceModel, slot_device: np.ndarray, num_devices: int) -> CostTable:
    """A CostTable of `device` for R1 with P physical slots: slot_device [P] the device of each slot (the
    table's "experts" are the slots, so replicas are priced where they run)."""
    signature = MeshSignature(
        platform="simulated",
        device_kind=device.name,
        num_devices=num_devices,
        num_processes=num_devices,
        mesh=f"data=1,expert={num_devices},tensor=1",
        hidden_size=R1_HIDDEN,
        moe_intermediate_size=R1_WIDTH,
        n_routed_experts=len(slot_device),
        num_experts_per_tok=R1_TOP_K,
        dtype=device.dtype,
        backend=device.backend.value,
    )
    costs = DeviceCosts(device.fixed_s, device.pair_s, device.activation_s, (0.0, 0.0, 0.0), device.comm_token_s)
    not_fitted = FitQuality(samples=0, r2=math.nan, mape=math.nan, median_abs_residual_s=0.0, max_abs_residual_s=0.0)
    return CostTable(signature, (costs,) * num_devices, tuple(int(d) for d in slot_device), not_fitted)
