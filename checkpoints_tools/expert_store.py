"""Write a model's routed experts as a disk expert store (`caee_jax/offload/disk_store.py`).

    python -m checkpoints_tools.expert_store [--model DIR | --preset NAME] --out DIR [--dtype float32|bfloat16]

--model: any checkpoint `caee_jax.load` reads (HF directory, converted Orbax directory); --preset: a
random-weight preset (seed 0, for tests and benchmarks); neither: the bundled model. A converted (Orbax)
checkpoint is streamed one MoE layer at a time, so its experts may be larger than memory; the converter
writes a store the same way (`convert_hf --expert-store DIR`). --dtype: the stored
dtype (default: the checkpoint's, float32 for HF directories and presets). The store is written
atomically (DST.partial, then a rename) and an existing DST is never overwritten. Exit status 2 on a
user mistake (missing checkpoint, unknown preset, existing output, ...), with a one-line error.
"""

from __future__ import annotations

import argparse
import os
import sys

import caee_jax
from caee_jax.api import BUNDLED_MODEL, DTYPES
from caee_jax.config import ConfigError, ModelConfig
from caee_jax.files import LockedError
from caee_jax.offload.disk_store import write_disk_store
from caee_jax.offload.store import StoreError
from caee_jax.routing.backend import ExpertWeights
from caee_jax.weights.orbax_checkpoint import ExpertLayers, is_converted
from caee_jax.weights.safetensors_io import CheckpointError

USER_ERRORS = (CheckpointError, ConfigError, StoreError, LockedError, FileNotFoundError, NotADirectoryError)


def _load(args: argparse.Namespace) -> tuple[caee_jax.Model, str]:
    """The model to store and a description of its source (recorded in the manifest)."""
    if args.preset:
        return caee_jax.init_random(args.preset, dtype=args.dtype or "float32"), f"preset {args.preset} (seed 0)"
    path = os.path.abspath(args.model or BUNDLED_MODEL)
    return caee_jax.load(path, dtype=args.dtype), path


def write_from_converted(directory: str, out: str, dtype=None, progress: bool = True) -> dict:
    """Writes the store of a converted checkpoint, reading one MoE layer's experts at a time; returns the
    manifest. dtype: the stored dtype (default: the checkpoint's)."""
    directory = os.path.abspath(directory)
    config = ModelConfig.from_hf(directory)
    stacks = ExpertWeights(*(ExpertLayers(directory, config, name, dtype) for name in ExpertWeights._fields))
    return write_disk_store(out, config, stacks, source=directory, progress=progress)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    source.add_argument("--preset", help="random-weight preset name, e.g. tiny")
    parser.add_argument("--out", required=True, help="store directory to create (must not exist)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="stored dtype (default: the checkpoint's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        if os.path.exists(args.out):  # before loading the model; the writer checks again under its lock
            raise StoreError(f"{args.out}: exists; remove it first or choose another output")
        if args.model and is_converted(args.model):
            manifest = write_from_converted(args.model, args.out, args.dtype, progress=not args.no_progress)
        else:
            model, description = _load(args)
            manifest = write_disk_store(
                args.out, model.config, model.state, source=description, progress=not args.no_progress
            )
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    records = manifest["num_moe_layers"] * manifest["n_routed_experts"]
    print(
        f"wrote {args.out}: {manifest['num_moe_layers']} layers x {manifest['n_routed_experts']} experts, "
        f"{manifest['dtype']}, {records * manifest['record_bytes'] / 2**20:.1f} MiB, fingerprint "
        f"{manifest['fingerprint'][:16]}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
