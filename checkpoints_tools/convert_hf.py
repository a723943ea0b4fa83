"""Convert an HF DeepSeek-layout checkpoint (FP8 block-scaled, bf16 or fp32) into caee-jax's Orbax format.

    python -m checkpoints_tools.convert_hf --hf-dir SRC --out DST [--dtype bfloat16|float32] [--keep-fp8]
        [--verify] [--expert-store STORE]

- Checks the whole source first, from the safetensors headers (`HFSource.check`): a missing, unexpected,
  misshapen or wrongly typed tensor, an FP8 tensor without its scale, a truncated or corrupted file or an
  index pointing at a missing shard stops the run with an error naming file and tensor, before anything
  is written.
- Streams: one unit (a layer, the top-level tensors, an MTP module) is read, dequantised, assembled and
  written at a time, so memory stays near the largest layer's size (`weights/orbax_checkpoint.py` has
  the layout).
- Atomic: everything is written to DST.partial, renamed to DST once complete; DST is absent or complete.
  An existing DST is never overwritten. A run holds an exclusive lock on DST (DST.lock, `files.exclusive_lock`)
  from its first write to the rename: a second run on the same DST stops at once (exit status 2) and touches
  nothing. Before the rename every unit must have its marker and an intact Orbax item (`check_unit`).
- Resumable: a unit's marker (DST.partial/.done/UNIT) is written once its data is fsynced; a rerun with
  the same arguments skips marked units and rewrites any unit that was cut short.
- --keep-fp8 stores the routed experts as the release has them: their float8_e4m3fn bytes and float32
  128x128 block scales, unchanged (transposed to [in, out]); `caee_jax.load` then holds them as FP8
  (`routing/storage.py`). Every other tensor is dequantised to --dtype as usual.
- --verify checks every unit's item, then re-reads a sample of parameters from DST and compares them bit for
  bit with the source (dequantised to the target dtype); exit status 2 on a damaged unit or a mismatch.
- --expert-store STORE then writes DST's routed experts as a disk expert store for offloading
  (`checkpoints_tools/expert_store.py`), one MoE layer at a time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import time

import jax
import ml_dtypes
import numpy as np
from tqdm import tqdm

from caee_jax.caee import expert_means, importance
from caee_jax.config import ConfigError, ModelConfig
from caee_jax.files import LockedError, atomic_write, exclusive_lock
from caee_jax.offload.store import StoreError
from caee_jax.routing.storage import BLOCK, Storage
from caee_jax.weights.hf_layout import fp8_expert_scale_recipes, is_buffer, mtp_module, stacks
from caee_jax.weights.hf_source import HFSource
from caee_jax.weights.orbax_checkpoint import (
    FORMAT,
    METADATA,
    VERSION,
    Unit,
    check_unit,
    fsync,
    is_converted,
    read_metadata,
    restore_unit,
    save_unit,
    stored_weights,
    units,
)
from caee_jax.weights.safetensors_io import CheckpointError
from checkpoints_tools.expert_store import write_from_converted

DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}
PLAN = "plan.json"  # in DST.partial: what is being converted; a resume must match it
DONE = ".done"  # DST.partial/.done/<unit>: the unit is complete and durable
COPIED = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
    expert_means.FILENAME,  # calibrated per-expert means: `--compensation mean` needs them beside the weights
    importance.FILENAME,  # CAEE's calibrated importance: the launchers read it beside the weights
)


class ConversionError(Exception):
    """The destination cannot be written as asked (it exists, or a partial run of another conversion)."""


def plan_units(source: HFSource, config: ModelConfig, dtype: np.dtype, log=print, keep_fp8: bool = False) -> list[Unit]:
    """Every unit to write, after checking the whole source. MTP modules are kept when the source has them."""
    mtp = config.num_nextn_predict_layers
    if mtp and not any(mtp_module(name, config) is not None for name in source.reader):
        log(
            f"note: {source.directory} has no MTP tensors (model.layers.{config.num_hidden_layers}.*) although "
            f"num_nextn_predict_layers = {mtp}; converting the main model only"
        )
        mtp = 0
    plan = units(config, dtype, mtp, Storage.FP8 if keep_fp8 else None)
    source.check([recipe for unit in plan for recipe in unit.recipes], skip=is_buffer)
    return plan


def _check_fp8_experts(source: HFSource, config: ModelConfig) -> None:
    """--keep-fp8 needs every routed expert weight in FP8 with 128x128 blocks; CheckpointError names the first
    that is not (a missing one is named by the source check)."""
    if source.block != BLOCK:
        raise CheckpointError(f"{source.directory}: FP8 blocks {source.block}; --keep-fp8 needs {BLOCK}")
    for layer in dict(stacks(config))["moe_layers"]:
        for name in (n for recipe in fp8_expert_scale_recipes(config, layer) for n in recipe.sources):
            if name in source.reader and not source.is_fp8(name):
                file, dtype = source.reader.file_of(name), source.reader.dtype(name)
                raise CheckpointError(f"{file}: tensor {name!r} is {dtype}; --keep-fp8 needs FP8 routed experts")


def _fingerprint(source: HFSource, dtype: np.dtype) -> str:
    """Identifies a conversion: every source tensor's name, dtype, shape and size, config.json, target dtype."""
    digest = hashlib.sha256(str(dtype).encode())
    with open(os.path.join(source.directory, "config.json"), "rb") as f:
        digest.update(f.read())
    reader = source.reader
    for name in sorted(reader):
        digest.update(f"{name}|{reader.dtype(name)}|{reader.shape(name)}|{reader.nbytes(name)}\n".encode())
    return digest.hexdigest()


def _write_durably(path: str, text: str) -> None:
    """Writes `path` through a temporary file and a rename, fsynced: it exists complete or not at all."""
    with atomic_write(path) as f:
        f.write(text)
    fsync(os.path.dirname(path))


def _copy_durably(source: str, target: str) -> None:
    """Copies through a temporary file and a rename, fsynced: `target` exists complete or not at all."""
    with open(source, "rb") as src, atomic_write(target, "wb") as dst:
        shutil.copyfileobj(src, dst)
    fsync(os.path.dirname(target))


def _unit_marker(partial: str, unit: Unit) -> str:
    return os.path.join(partial, DONE, unit.name.replace("/", "."))


def _remove_unit_leftovers(partial: str, unit: Unit) -> None:
    """A unit cut short: its directory and any Orbax temporary siblings."""
    parent, base = os.path.split(os.path.join(partial, unit.name))
    if os.path.isdir(parent):
        for entry in os.listdir(parent):
            if entry == base or entry.startswith(base + "."):
                shutil.rmtree(os.path.join(parent, entry))


def _start_or_resume(out: str, fingerprint: str, dtype: np.dtype, log) -> str:
    """DST.partial, fresh or from an interrupted run of the same conversion."""
    partial = out + ".partial"
    if os.path.exists(partial):
        try:
            with open(os.path.join(partial, PLAN)) as f:
                previous = json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            if not is_converted(partial):  # a finished run whose rename was cut short has dropped its plan
                raise ConversionError(f"{partial}: exists but is not a conversion in progress; remove it") from None
            previous = {"fingerprint": fingerprint, "dtype": dtype.name}
        if previous != {"fingerprint": fingerprint, "dtype": dtype.name}:
            raise ConversionError(
                f"{partial}: an interrupted conversion of another source or dtype ({previous.get('dtype')}); "
                "remove it or rerun with its arguments"
            )
        log(f"resuming {partial}")
    else:
        staging = partial + ".init"
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(os.path.join(staging, DONE))
        _write_durably(os.path.join(staging, PLAN), json.dumps({"fingerprint": fingerprint, "dtype": dtype.name}))
        os.rename(staging, partial)
        fsync(os.path.dirname(os.path.abspath(partial)))
    return partial


def _copy_side_files(hf_dir: str, partial: str) -> None:
    """config.json (without quantization_config: the weights are no longer FP8), tokenizer files and the
    calibrated expert means."""
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = json.load(f)
    config.pop("quantization_config", None)
    _write_durably(os.path.join(partial, "config.json"), json.dumps(config, indent=2))
    for name in COPIED:
        if os.path.isfile(os.path.join(hf_dir, name)):
            _copy_durably(os.path.join(hf_dir, name), os.path.join(partial, name))


def _check_complete(partial: str, plan: list[Unit]) -> None:
    """Raises ConversionError unless every unit is marked done and its Orbax item holds all its parameters.
    Runs before the metadata that makes DST.partial publishable is written: whatever went wrong (a unit
    replaced or removed behind this run's back), a damaged unit is never published. Its marker is dropped,
    so a rerun rewrites it."""
    for unit in plan:
        marker = _unit_marker(partial, unit)
        if not os.path.exists(marker):
            raise ConversionError(f"{partial}: unit {unit.name} is not marked complete; not publishing (rerun)")
        try:
            check_unit(os.path.join(partial, unit.name), unit.abstract)
        except CheckpointError as e:
            os.remove(marker)
            raise ConversionError(f"{e}; not publishing (rerun to rewrite unit {unit.name})") from None


def _refuse_existing(out: str) -> None:
    if os.path.exists(out):
        if is_converted(out):
            raise ConversionError(f"{out}: already a complete conversion; remove it first (or check it with --verify)")
        raise ConversionError(f"{out}: exists and is not a caee-jax conversion; refusing to overwrite it")


def _finish(partial: str, out: str) -> None:
    """Drops the bookkeeping and renames DST.partial to DST (atomic on one filesystem)."""
    shutil.rmtree(os.path.join(partial, DONE), ignore_errors=True)
    if os.path.exists(os.path.join(partial, PLAN)):
        os.remove(os.path.join(partial, PLAN))
    fsync(partial)
    os.rename(partial, out)
    fsync(os.path.dirname(os.path.abspath(out)))


def build_unit(source: HFSource, unit: Unit, on_read=None) -> dict[tuple[str, ...], np.ndarray]:
    """The unit's parameters from the source, each in its target dtype and shape. on_read(name) is called
    after each source tensor is read (progress)."""
    values = {}
    for recipe in unit.recipes:
        abstract = unit.abstract[recipe.target]

        def get(name: str, transpose: bool = False, dtype=abstract.dtype) -> np.ndarray:
            value = source.read(name, dtype, transpose)
            if on_read is not None:
                on_read(name)
            return value

        value = recipe.build(get)
        if value.shape != abstract.shape:
            raise AssertionError(f"{unit.name}: {recipe.target} built as {value.shape}, expected {abstract.shape}")
        values[recipe.target] = value
    return values


def convert(
    hf_dir: str, out: str, dtype: str = "bfloat16", progress: bool = True, log=print, keep_fp8: bool = False
) -> dict:
    """Converts `hf_dir` into `out` (see the module docstring); returns a summary (units, bytes, seconds).
    keep_fp8: routed experts stored as the release's FP8 bytes and block scales (--keep-fp8)."""
    started = time.perf_counter()
    dtype, out = DTYPES[dtype], os.path.normpath(out)
    _refuse_existing(out)
    config = ModelConfig.from_hf(hf_dir)
    source = HFSource(hf_dir, config)
    if keep_fp8:
        _check_fp8_experts(source, config)
    plan = plan_units(source, config, dtype, log, keep_fp8)
    total = sum(source.nbytes(name) for unit in plan for name in {n for r in unit.recipes for n in r.sources})
    # Locked from the first write to the rename: two runs interleaving on one DST.partial would remove
    # and rewrite each other's units. Taken after the source checks, so a bad source leaves nothing behind.
    with exclusive_lock(out):
        _refuse_existing(out)  # again: another run may have published DST while this one checked the source
        written, skipped = _convert_locked(hf_dir, out, source, plan, dtype, total, progress, log, keep_fp8)
    seconds = time.perf_counter() - started
    return {"units": len(plan), "written": written, "skipped": skipped, "source_bytes": total, "seconds": seconds}


def _convert_locked(
    hf_dir: str,
    out: str,
    source: HFSource,
    plan: list[Unit],
    dtype: np.dtype,
    total: int,
    progress: bool,
    log,
    keep_fp8: bool,
) -> tuple[int, int]:
    """Writes (or resumes) DST.partial and publishes it as DST; returns (units written, units skipped).
    total: the source bytes the plan reads (progress bar and metadata)."""
    fingerprint = _fingerprint(source, dtype) + ("+keep-fp8" if keep_fp8 else "")
    partial = _start_or_resume(out, fingerprint, dtype, log)
    written = skipped = 0
    if not is_converted(partial):
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress) as bar:
            for unit in plan:
                names = {n for r in unit.recipes for n in r.sources}
                if os.path.exists(_unit_marker(partial, unit)):
                    skipped += 1
                    bar.update(sum(source.nbytes(n) for n in names))
                    continue
                bar.set_postfix_str(unit.name)
                _remove_unit_leftovers(partial, unit)
                counted: set[str] = set()

                def on_read(name: str, counted=counted, names=names) -> None:
                    if name not in counted and name in names:  # a scale is counted with its weight
                        counted.add(name)
                        bar.update(source.nbytes(name))

                values = build_unit(source, unit, on_read)
                save_unit(os.path.join(partial, unit.name), values)
                del values
                _write_durably(_unit_marker(partial, unit), "")
                written += 1
        if skipped:
            log(f"resumed: {skipped} of {len(plan)} units were already converted")
        _check_complete(partial, plan)
        _copy_side_files(hf_dir, partial)
        metadata = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": dtype.name,
            "units": [unit.name for unit in plan],
            "mtp_modules": sum(unit.name.startswith("mtp/") for unit in plan),
            **({"weights": Storage.FP8.value} if keep_fp8 else {}),
            "source": {"fp8_block": list(source.block), "bytes": total, "tensors": len(list(source.reader))},
        }
        _write_durably(os.path.join(partial, METADATA), json.dumps(metadata, indent=2))
    _finish(partial, out)
    return written, skipped


def damaged_units(out: str, plan: list[Unit], log=print) -> list[str]:
    """The units of `out` whose Orbax item is missing, cut short or holds other parameters (each logged with
    the unit and parameter at fault); reads the items' metadata only."""
    damaged = []
    for unit in plan:
        try:
            check_unit(os.path.join(out, unit.name), unit.abstract)
        except CheckpointError as e:
            log(f"DAMAGED {e}")
            damaged.append(unit.name)
    return damaged


def verify(hf_dir: str, out: str, samples: int = 8, seed: int = 0, log=print) -> bool:
    """Checks every unit's item (`damaged_units`), then re-reads `samples` parameters of the intact units
    (one routed-expert stack always among them) from `out` and compares them bit for bit with the source
    rebuilt in the stored dtype. Returns True when no unit is damaged and all samples match."""
    metadata = read_metadata(out)
    config = ModelConfig.from_hf(out)
    source = HFSource(hf_dir, config)
    dtype = DTYPES[metadata["dtype"]]
    plan = units(config, dtype, metadata["mtp_modules"], stored_weights(out))
    damaged = damaged_units(out, plan, log)
    pairs = [(unit, recipe) for unit in plan if unit.name not in damaged for recipe in unit.recipes]
    picked = random.Random(seed).sample(pairs, min(samples, len(pairs)))
    experts = [pair for pair in pairs if len(pair[1].sources) > 1]
    if experts and not any(len(recipe.sources) > 1 for _, recipe in picked):
        picked[-1] = experts[-1]
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    ok = True
    for unit, recipe in picked:
        abstract = unit.abstract[recipe.target]
        where = f"{unit.name}/{'.'.join(recipe.target)}"
        target = jax.ShapeDtypeStruct(abstract.shape, abstract.dtype, sharding=device)
        try:
            stored = restore_unit(os.path.join(out, unit.name), {recipe.target: target}, partial=True)
        except (OSError, ValueError) as e:  # data lost behind intact metadata; Orbax names the array
            log(f"DAMAGED {where}: {str(e).splitlines()[0]}")
            ok = False
            continue
        stored = np.asarray(stored[recipe.target])
        read = lambda name, transpose=False, dtype=abstract.dtype: source.read(name, dtype, transpose)  # noqa: E731
        expected = np.ascontiguousarray(recipe.build(read))
        same = stored.shape == expected.shape and np.array_equal(
            stored.view(f"u{stored.itemsize}"), expected.view(f"u{expected.itemsize}")
        )
        ok &= same
        log(f"{'ok' if same else 'MISMATCH'} {where} {abstract.shape} {abstract.dtype} ({len(recipe.sources)} tensors)")
    if damaged:
        log(f"verify: {len(damaged)} of {len(plan)} units damaged ({', '.join(damaged)}); {out} must be reconverted")
    log(f"verify: {'all' if ok else 'NOT all'} {len(picked)} sampled parameters match the source bit for bit")
    return ok and not damaged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-dir", required=True, help="HF checkpoint directory (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="destination directory (must not exist)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="stored parameter dtype")
    parser.add_argument(
        "--keep-fp8", action="store_true", help="store the routed experts as the release's FP8 bytes + block scales"
    )
    parser.add_argument("--verify", action="store_true", help="then compare a sample of parameters with the source")
    parser.add_argument("--verify-samples", type=int, default=8, help="parameters compared by --verify")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--expert-store", help="then write the routed experts as a disk expert store here (offload)")
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr)

    if args.keep_fp8 and args.expert_store:
        log("error: --expert-store holds f32/bf16 experts; it cannot be written from --keep-fp8 (FP8) experts")
        return 2
    try:
        if args.verify and is_converted(args.out):
            log(f"{args.out} is already a complete conversion: verifying it")
        else:
            summary = convert(
                args.hf_dir, args.out, args.dtype, progress=not args.no_progress, log=log, keep_fp8=args.keep_fp8
            )
            megabytes = summary["source_bytes"] / 2**20
            print(
                f"converted {args.hf_dir} -> {args.out}: {summary['units']} units ({summary['skipped']} resumed), "
                f"{megabytes:.1f} MiB in {summary['seconds']:.1f} s ({megabytes / summary['seconds']:.1f} MiB/s)"
            )
        if args.verify and not verify(args.hf_dir, args.out, args.verify_samples, log=log):
            return 2
        if args.expert_store:
            manifest = write_from_converted(args.out, args.expert_store, progress=not args.no_progress)
            print(f"wrote expert store {args.expert_store} (fingerprint {manifest['fingerprint'][:16]})")
    except StoreError as e:
        log(f"error: {e}")
        return 2
    except LockedError as e:
        log(f"error: {e}")
        return 2
    except (CheckpointError, ConfigError, ConversionError) as e:
        log(f"error: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
