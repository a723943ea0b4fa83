"""Cost tables: what executing experts costs on each device of a mesh, in seconds, keyed by a mesh signature.

A table is a frozen, hashable value: jitted code takes it as a static argument, so its numbers are
compiled in as constants (a new table recompiles; new routing, batches or residency never do). Stored
as JSON under `configs/cost_tables/`, written atomically.

Per device (device i = expert shard i; data replicas of a shard behave alike):
  fixed_s        every MoE layer, whatever the routing (launch, gather/scatter, collectives' latency)
  pair_s         each kept token-expert pair it computes (in the loop backend's whole tiles, see cost_model)
  activation_s   each expert it runs at all (reading its weights once per step)
  fetch_s        each non-resident expert it runs, per offload tier (bringing the weights in): timed apart
                 from the runtime by `launch/calibrate.py`, replaced by the offloaded runtime's own
                 per-miss time by `launch/calibrate.py --offload TIER`
  comm_token_s   each token of the batch exchanged with the other devices (0 on one device)
  offload_layer_s  each MoE layer whose experts are not all on the device, per offload tier (the store's):
                 the offloaded path's fixed cost (its host callbacks, and the slower dispatch of a step
                 with effects, `offload/execute.py`), fitted in situ by `launch/calibrate.py --offload TIER`.
  offload_read_s   each MoE layer that runs a non-resident expert, per offload tier, on top of the above:
                 its host callback (a layer with nothing to read makes none), fitted with it.
                 Tables written before these two existed load with 0 (the prediction then omits them).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from caee_jax import html
from caee_jax.files import atomic_write
from caee_jax.routing.backend import ExpertBackend
from caee_jax.routing.storage import Storage

FORMAT = "caee-cost-table/1"
TIERS = ("device", "host", "disk")  # residency codes 0, 1, 2
PER_TIER = ("fetch_s", "offload_layer_s", "offload_read_s")  # DeviceCosts fields with one entry per tier
DEFAULT_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs", "cost_tables"
)


class CostTableError(ValueError):
    """A cost table that cannot be used here: malformed, or calibrated for another mesh."""


@dataclasses.dataclass(frozen=True)
class MeshSignature:
    """What a table's figures depend on; a table only applies where every field is equal.

    weights: how the routed experts are stored (`routing/storage.py`: "f32", "bf16", "fp8"): an expert's
    activation cost is the reading of its stored bytes. Empty (tables written before the field, and
    positional construction without it): the experts were held in `dtype`, normalised to "f32"/"bf16".
    slowed: the process a local cluster slowed on purpose while the table was calibrated, "ID:FACTOR"
    (`launch/calibrate.py --slow-process`, `parallel/straggler.py`); empty: none. Such a table only applies to
    a run slowed the same way, so it is stored apart and never picked for an unslowed run.
    """

    platform: str
    device_kind: str
    num_devices: int
    num_processes: int
    mesh: str
    hidden_size: int
    moe_intermediate_size: int
    n_routed_experts: int
    num_experts_per_tok: int
    dtype: str
    backend: str
    weights: str = ""
    slowed: str = ""

    def __post_init__(self):
        object.__setattr__(self, "weights", Storage.of(self.weights or None, self.dtype).value)

    @property
    def in_compute_dtype(self) -> bool:
        """Whether the routed experts are held in the compute dtype (tables predating `weights` all were)."""
        return self.weights == Storage.of(None, self.dtype)

    def slug(self) -> str:
        """A readable file name stem; experts stored other than in the compute dtype add their storage."""
        kind = "".join(c if c.isalnum() else "-" for c in self.device_kind.lower()).strip("-")
        dims = f"d{self.hidden_size}-f{self.moe_intermediate_size}-e{self.n_routed_experts}-k{self.num_experts_per_tok}"
        mesh = self.mesh.replace(",", "_").replace("=", "")
        stored = "" if self.in_compute_dtype else f"-{self.weights}"
        slowed = f"-slow{self.slowed.replace(':', 'x')}" if self.slowed else ""
        return f"{self.platform}-{kind}-p{self.num_processes}-{mesh}-{dims}-{self.dtype}-{self.backend}{stored}{slowed}"

    def differences(self, other: MeshSignature) -> list[str]:
        return [
            f"{f.name}: table {getattr(self, f.name)!r}, here {getattr(other, f.name)!r}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]


@dataclasses.dataclass(frozen=True)
class DeviceCosts:
    """One device's costs, seconds. fetch_s: per tier of TIERS (the "device" tier costs nothing)."""

    fixed_s: float
    pair_s: float
    activation_s: float
    fetch_s: tuple[float, float, float]
    comm_token_s: float
    offload_layer_s: tuple[float, float, float] = (0.0, 0.0, 0.0)
    offload_read_s: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __post_init__(self):
        """Every figure a finite, non-negative number of seconds: a NaN or negative cost would silently
        change every pruning decision."""
        for name in PER_TIER:
            if len(getattr(self, name)) != len(TIERS):
                raise CostTableError(f"{name} has {len(getattr(self, name))} entries; one per tier {TIERS} is needed")
        for field in dataclasses.fields(self):
            values = getattr(self, field.name)
            for value in values if isinstance(values, tuple) else (values,):
                if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                    raise CostTableError(f"{field.name} is {value!r}; costs are finite seconds >= 0")

    def with_tier(self, tier: int, **values: float) -> DeviceCosts:
        """These costs with entry `tier` of the named PER_TIER fields set to `values` (seconds)."""

        def put(name: str, value: float) -> tuple:
            return tuple(float(value) if i == tier else c for i, c in enumerate(getattr(self, name)))

        return dataclasses.replace(self, **{name: put(name, value) for name, value in values.items()})


@dataclasses.dataclass(frozen=True)
class FitQuality:
    """How well the fitted model explains the calibration measurements."""

    samples: int
    r2: float
    mape: float
    median_abs_residual_s: float
    max_abs_residual_s: float


@dataclasses.dataclass(frozen=True)
class CostTable:
    """devices: one DeviceCosts per expert shard; placement: the shard of each expert (E entries), or of
    each physical slot (P >= E entries, `over_slots`) when the experts are replicated."""

    signature: MeshSignature
    devices: tuple[DeviceCosts, ...]
    placement: tuple[int, ...]
    fit: FitQuality

    def _repr_html_(self) -> str:
        """The setup it applies to, each device's costs in microseconds, and the fit."""
        rows = [
            [d, self.placement.count(d), *(1e6 * v for v in (c.fixed_s, c.pair_s, c.activation_s, *c.fetch_s[1:]))]
            + [1e6 * c.comm_token_s]
            for d, c in enumerate(self.devices)
        ]
        header = ["device", "experts", "fixed", "per pair", "per expert", "fetch host", "fetch disk", "per token"]
        fit = self.fit
        return (
            html.fields_table(self.signature, "cost table: setup", columns=3)
            + html.table("costs (µs)", header, rows)
            + html.table(
                "fit", ["samples", "R²", "MAPE", "median |residual| µs"],
                [[fit.samples, fit.r2, fit.mape, 1e6 * fit.median_abs_residual_s]],
            )
        )  # fmt: skip

    def __post_init__(self):
        if not self.devices:
            raise CostTableError("devices is empty; a table has one entry per expert shard")
        if len(self.placement) < self.signature.n_routed_experts:
            raise CostTableError(
                f"placement has {len(self.placement)} entries for {self.signature.n_routed_experts} experts"
            )
        if sorted(set(self.placement)) != list(range(len(self.devices))):
            raise CostTableError(f"placement must use every device 0..{len(self.devices) - 1} and no other")

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def backend(self) -> ExpertBackend:
        """The expert backend the table prices (its unit of saving: `ExpertBackend.row_tile`)."""
        return ExpertBackend(self.signature.backend)

    def per_device(self, name: str) -> jax.Array:
        """One DeviceCosts field over the devices: [S] f32 (fetch_s: [S, tiers]), a compile-time constant."""
        return jnp.asarray(np.array([getattr(d, name) for d in self.devices], np.float32))

    def placement_array(self) -> jax.Array:
        """[E] int32: the device of each expert."""
        return jnp.asarray(np.array(self.placement, np.int32))

    def compute_scaled(self, factor: float) -> CostTable:
        """This table with every device's compute constants (fixed_s, pair_s, activation_s) times `factor`: a
        table off by that factor (how the stale-table probe is tested)."""
        devices = tuple(
            dataclasses.replace(
                d, fixed_s=d.fixed_s * factor, pair_s=d.pair_s * factor, activation_s=d.activation_s * factor
            )
            for d in self.devices
        )
        return dataclasses.replace(self, devices=devices)

    def priced_as(self, tier: str, as_tier: str) -> CostTable:
        """This table with `tier`'s figures (PER_TIER) replaced by `as_tier`'s on every device: e.g. a host
        store priced as the disk tier makes the disk store's decisions (they depend on residency and the
        prices alone) at host speed (`launch/eval.py --price-misses-as`)."""
        which, source = TIERS.index(tier), TIERS.index(as_tier)
        devices = tuple(
            d.with_tier(which, **{name: getattr(d, name)[source] for name in PER_TIER}) for d in self.devices
        )
        return dataclasses.replace(self, devices=devices)

    def over_slots(self, num_slots: int) -> CostTable:
        """This table for P = `num_slots` physical expert slots (replicated experts, `parallel/replicas.py`):
        slot p on device p // (P / S), as `shard_map` places a [P, ...] stack. Each slot is priced as the
        expert it copies was on its device: the per-device constants hold per pair and per active expert
        (an active replica reads its own copy of the weights), so only the placement changes. Only a table
        of the contiguous block placement (what calibration measures) can be moved so; any other is refused."""
        sig = self.signature
        blocks = block_placement(sig.n_routed_experts, self.num_devices)
        if self.placement not in (blocks, block_placement(num_slots, self.num_devices)):
            raise CostTableError(
                "the cost table's placement is not the contiguous block placement; it cannot be moved onto "
                f"{num_slots} replicated expert slots (calibrate a table with launch/calibrate.py)"
            )
        return dataclasses.replace(self, placement=block_placement(num_slots, self.num_devices))

    def to_json(self) -> dict:
        return {"format": FORMAT, "units": "seconds", **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: dict, where: str = "cost table") -> CostTable:
        """A table from its JSON form; CostTableError names `where` and the field at fault."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise CostTableError(f"{where}: format {found!r} is not {FORMAT!r}")
        try:
            devices = []
            for i, device in enumerate(data["devices"]):
                try:
                    tiers = {name: tuple(device[name]) for name in PER_TIER if name in device}
                    devices.append(DeviceCosts(**{**device, **tiers}))  # no offload_*: an older table, 0
                except CostTableError as error:
                    raise CostTableError(f"devices[{i}].{error}") from None
            return cls(
                signature=MeshSignature(**data["signature"]),
                devices=tuple(devices),
                placement=tuple(int(p) for p in data["placement"]),
                fit=FitQuality(**data["fit"]),
            )
        except CostTableError as error:
            raise CostTableError(f"{where}: {error}") from None
        except (KeyError, TypeError, ValueError) as error:
            raise CostTableError(f"{where}: malformed ({error})") from error


def block_placement(num_experts: int, num_devices: int) -> tuple[int, ...]:
    """Expert e lives on shard e // (E / S): the contiguous blocks `shard_map` gives each expert shard."""
    if num_experts % num_devices:
        raise CostTableError(f"{num_experts} experts do not divide {num_devices} devices")
    per = num_experts // num_devices
    return tuple(e // per for e in range(num_experts))


def save_table(table: CostTable, directory: str = DEFAULT_DIR, extra: dict | None = None) -> str:
    """Writes `<directory>/<signature slug>.json` atomically (temporary file, then rename); returns the path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, table.signature.slug() + ".json")
    with atomic_write(path) as f:
        json.dump({**table.to_json(), **(extra or {})}, f, indent=2)
        f.write("\n")
    return path


def load_table(path: str, expected: MeshSignature | None = None, *, override: bool = False) -> CostTable:
    """Reads a table; with `expected`, a signature mismatch is an error listing what differs (unless override)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CostTableError(f"{path}: no such cost table (calibrate with launch/calibrate.py)") from None
    except json.JSONDecodeError as error:
        raise CostTableError(f"{path}: not valid JSON ({error})") from error
    table = CostTable.from_json(data, path)
    if expected is not None and not override:
        diff = table.signature.differences(expected)
        if diff:
            raise CostTableError(
                f"{path} was calibrated for another setup: "
                + "; ".join(diff)
                + " (to use it anyway: --cost-table-any-setup, or override=True from Python)"
            )
    return table


def table_for(signature: MeshSignature, directory: str = DEFAULT_DIR) -> CostTable:
    """The stored table of exactly this signature. Missing while a table for the same setup with the experts
    in the compute dtype exists: a CostTableError naming `weights` (that table prices other bytes per expert);
    missing for a slowed cluster: one naming the command that calibrates it."""
    path = os.path.join(directory, signature.slug() + ".json")
    held = dataclasses.replace(signature, weights="")
    other = os.path.join(directory, held.slug() + ".json")
    if not os.path.exists(path) and not signature.in_compute_dtype and os.path.exists(other):
        raise CostTableError(
            f"{path}: no cost table for routed experts stored as weights={signature.weights!r}; {other} was "
            f"calibrated with weights={held.weights!r} and is not used for them (calibrate with launch/calibrate.py "
            f"--weights {signature.weights}, or pass that table with --cost-table and --cost-table-any-setup)"
        )
    if signature.slowed and not os.path.exists(path):
        raise CostTableError(
            f"{path}: no cost table calibrated with process {signature.slowed.replace(':', ' slowed ')}x (calibrate "
            f"with launch/calibrate.py --local-processes {signature.num_processes} --slow-process {signature.slowed})"
        )
    return load_table(path, signature)
