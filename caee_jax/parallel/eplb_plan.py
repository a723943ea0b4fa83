"""Where a run's EPLB placement comes from: balanced from measured expert loads, or a saved file.

Loads are the routed-token counts per MoE layer and expert [L, E] that the `mean` compensation
calibration measures on calibration text (`expert_means.npz`, `launch/calibrate_means.py`): never the
evaluation text, so a placement tuned to it cannot flatter the evaluation. `balance` packs them for
the expert shards of the mesh the model runs on (DeepSeek's algorithm, `eplb.py`; global: a run's
expert shards are treated as one node). Speed-aware (`--eplb-speed-aware`): each shard weighed by its
cost in a calibrated cost table (`device_costs`), so a slow shard routes fewer slots.

The file (.npz, written atomically; default `eplb_placement.npz` beside the checkpoint) holds
`slot_expert` and `replica_rank` [L, P] int64, `routed_count` [L, E] int64, the `loads` [L, E] it was
balanced from and the `device_cost` [S] it was balanced for (all ones: not speed-aware), int scalars
`num_devices` (expert shards), `tokens` (calibration tokens), `num_moe_layers`, `n_routed_experts`,
`num_experts_per_tok`, plus `format` and `version`. Reading checks it against the model and the mesh
and names the field at fault.
"""

from __future__ import annotations

import argparse
import os
import zipfile

import numpy as np

from caee_jax.caee import expert_means, npz_fields
from caee_jax.caee.cost_table import CostTable
from caee_jax.config import ModelConfig
from caee_jax.files import atomic_write
from caee_jax.parallel import eplb
from caee_jax.parallel.replicas import PlacementError, check_placement

FORMAT = "caee-eplb-placement"
VERSION = 2  # 2: routed_count, device_cost
FILENAME = "eplb_placement.npz"
DIMS = ("num_moe_layers", "n_routed_experts", "num_experts_per_tok")


def default_path(model_dir: str) -> str:
    return os.path.join(model_dir, FILENAME)


def device_costs(table: CostTable, num_shards: int, tokens: int = 16) -> np.ndarray:
    """[S] each expert shard's time for the same routed work over the cheapest shard's (>= 1), priced by
    `table`'s per-device constants: one expert active with its share of `tokens` tokens' pairs
    (activation_s + pair_s x tokens x K / E; a decode batch of 16 by default). PlacementError when the
    table prices another number of shards than `num_shards`."""
    if table.num_devices != num_shards:
        raise PlacementError(f"the cost table prices {table.num_devices} expert shard(s); this mesh has {num_shards}")
    sig = table.signature
    pairs = tokens * sig.num_experts_per_tok / sig.n_routed_experts
    cost = np.array([d.activation_s + d.pair_s * pairs for d in table.devices], np.float64)
    if not (cost > 0).all():
        raise PlacementError(f"the cost table prices a shard's routed work at {cost.tolist()} s; need > 0 everywhere")
    return cost / cost.min()


def from_loads(
    loads: np.ndarray, config: ModelConfig, num_slots: int, num_shards: int, device_cost: np.ndarray | None = None
) -> eplb.Placement:
    """loads [L_moe, E] (routed pairs per expert) -> a Placement of `num_slots` slots over `num_shards`
    expert shards (device_cost [S]: speed-aware, `eplb.balance`), checked against the model
    (PlacementError naming what does not fit)."""
    loads = np.asarray(loads)
    if loads.shape != (config.num_moe_layers, config.n_routed_experts):
        raise PlacementError(
            f"expert loads of shape {loads.shape}; this model needs [L_moe, E] = "
            f"{(config.num_moe_layers, config.n_routed_experts)}"
        )
    if num_slots < config.n_routed_experts or num_slots % num_shards:
        raise PlacementError(
            f"{num_slots} EPLB slots for {config.n_routed_experts} experts on {num_shards} expert shard(s): the slots "
            "must be at least the experts and a multiple of the expert shards"
        )
    try:
        placement = eplb.balance(loads, num_slots, num_shards, num_groups=config.n_group, device_cost=device_cost)
    except ValueError as error:
        raise PlacementError(str(error)) from None
    check_placement(placement, config.num_moe_layers, config.n_routed_experts, num_shards)
    return placement


def from_calibration(
    path: str, config: ModelConfig, num_slots: int, num_shards: int, device_cost: np.ndarray | None = None
) -> tuple[eplb.Placement, int]:
    """(Placement balanced from an `expert_means.npz`'s routed-token counts, its calibration tokens)."""
    calibration = expert_means.read(path, config)
    return from_loads(calibration.counts, config, num_slots, num_shards, device_cost), calibration.tokens


def save(
    path: str,
    placement: eplb.Placement,
    config: ModelConfig,
    loads: np.ndarray,
    tokens: int,
    device_cost: np.ndarray | None = None,
) -> None:
    """Writes the file atomically (`files.atomic_write`); device_cost: what it was balanced for (None: equal)."""
    fields = dict(format=np.str_(FORMAT), version=np.int64(VERSION), tokens=np.int64(tokens))
    fields |= {name: np.int64(getattr(config, name)) for name in DIMS}
    fields |= dict(
        num_devices=np.int64(placement.num_devices),
        slot_expert=np.asarray(placement.slot_expert, np.int64),
        replica_rank=np.asarray(placement.replica_rank, np.int64),
        routed_count=np.asarray(placement.routed_count, np.int64),
        loads=np.asarray(loads, np.float64),
        device_cost=np.ones(placement.num_devices) if device_cost is None else np.asarray(device_cost, np.float64),
    )
    with atomic_write(path, "wb") as f:
        np.savez(f, **fields)


def read(path: str, config: ModelConfig, num_shards: int) -> eplb.Placement:
    """The placement in the file, for this model on `num_shards` expert shards; PlacementError naming the file
    and the field when it is missing, unreadable, or made for another model or mesh."""
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise PlacementError(f"{path}: no such EPLB placement file") from None
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise PlacementError(f"{path}: not a readable .npz file ({error})") from error
    with archive:
        header = dict(format=FORMAT, version=VERSION, dims=DIMS, config=config)
        npz_fields.check_header(archive, path, PlacementError, **header)
        devices = npz_fields.integer(archive, path, "num_devices", PlacementError)
        if devices != num_shards:
            raise PlacementError(
                f"{path}: field 'num_devices' is {devices}; this mesh has {num_shards} expert shard(s) "
                "(balance a placement for it)"
            )
        tables = {
            name: npz_fields.field(archive, path, name, PlacementError)
            for name in ("slot_expert", "replica_rank", "routed_count")
        }
    for name, value in tables.items():
        if value.ndim != 2 or value.shape[0] != config.num_moe_layers or not np.issubdtype(value.dtype, np.integer):
            raise PlacementError(
                f"{path}: field {name!r} is {value.dtype} {value.shape}; expected integers [L_moe, P or E] with "
                f"L_moe = {config.num_moe_layers}"
            )
    if tables["slot_expert"].shape != tables["replica_rank"].shape:
        raise PlacementError(f"{path}: fields 'slot_expert' and 'replica_rank' differ in shape")
    placement = eplb.Placement(
        tables["slot_expert"], tables["replica_rank"], config.n_routed_experts, devices, tables["routed_count"]
    )
    try:
        check_placement(placement, config.num_moe_layers, config.n_routed_experts, num_shards)
    except PlacementError as error:
        raise PlacementError(f"{path}: {error}") from None
    return placement


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("EPLB: redundant expert replicas")
    source = group.add_mutually_exclusive_group()
    source.add_argument(
        "--eplb-slots",
        type=int,
        help="hold the routed experts in this many physical slots per MoE layer (a multiple of the expert shards), "
        "hot experts replicated, balanced from --eplb-loads",
    )
    source.add_argument("--eplb-placement", help="a saved placement (launch/plan_eplb.py) for this model and mesh")
    group.add_argument(
        "--eplb-speed-aware",
        action="store_true",
        help="with --eplb-slots: weigh each expert shard by its cost in the run's cost table, so a slower shard "
        "routes fewer of its slots (the others hold spare copies); needs more slots the more the shards differ",
    )
    group.add_argument(
        "--eplb-loads",
        help="with --eplb-slots: an expert_means.npz whose routed-token counts are the loads, measured on calibration "
        "text (launch/calibrate_means.py; default: CHECKPOINT/expert_means.npz)",
    )


def from_args(
    args: argparse.Namespace,
    config: ModelConfig,
    num_shards: int,
    model_dir: str | None,
    table: CostTable | None = None,
):
    """The run's Placement from the flags of `add_arguments` (None: none asked for). model_dir: where the
    default loads live (None: a model without files, e.g. a preset, which then needs --eplb-loads); table:
    the run's cost table, which --eplb-speed-aware needs."""
    for flag in ("eplb_loads", "eplb_speed_aware"):
        if getattr(args, flag) and not args.eplb_slots:
            raise PlacementError(f"--{flag.replace('_', '-')} needs --eplb-slots")
    if args.eplb_speed_aware and table is None:
        raise PlacementError("--eplb-speed-aware needs the run's cost table (launch/calibrate.py, or --cost-table)")
    if args.eplb_placement:
        return read(args.eplb_placement, config, num_shards)
    if not args.eplb_slots:
        return None
    if args.eplb_loads is None and model_dir is None:
        raise PlacementError("--eplb-slots on a model without calibration files needs --eplb-loads FILE")
    loads = args.eplb_loads or expert_means.default_path(model_dir)
    device_cost = device_costs(table, num_shards) if args.eplb_speed_aware else None
    return from_calibration(loads, config, args.eplb_slots, num_shards, device_cost)[0]
