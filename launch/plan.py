"""Plans a model on a mesh: per-device parameter and latent-cache bytes, and whether they fit.

    python launch/plan.py                                    # R1 671B, 16 devices of 141 GiB, batch 16, 4096 ctx
    python launch/plan.py --preset deepseek-r1-671b --mesh expert=8 --device-memory-gib 141 --json
    python launch/plan.py --mesh data=2,expert=32 --batch 64 --context 32768

The figures come from the sharded abstract model (eval_shape + the logical-axis rules on a simulated
mesh of that many CPU devices) and the decode step is lowered on that mesh; nothing is allocated.
Activations and compiler workspace are not included: keep a margin.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import jax

from caee_jax import cli
from caee_jax.config import PRESETS, preset
from caee_jax.memory_plan import GIB, plan_memory
from caee_jax.parallel.mesh import MeshError, make_mesh, parse_mesh_spec
from caee_jax.routing.storage import Storage


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="deepseek-r1-671b")
    parser.add_argument("--mesh", default="expert=16", help="mesh axes, e.g. data=2,expert=8 (simulated devices)")
    parser.add_argument("--device-memory-gib", type=float, default=141.0, help="memory of one device (GiB)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument(
        "--weights",
        choices=Storage.names(),
        help="routed experts' storage (fp8: e4m3 + 128x128 block scales); default: --dtype",
    )
    parser.add_argument("--batch", type=int, default=16, help="concurrent sequences")
    parser.add_argument("--context", type=int, default=4096, help="cache slots per sequence (tokens)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    cli.add_debug_flag(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        sizes = parse_mesh_spec(args.mesh)
    except MeshError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    num_devices = math.prod(sizes.values())
    jax.config.update("jax_num_cpu_devices", num_devices)
    config = preset(args.preset)
    try:
        plan = plan_memory(
            config,
            make_mesh(sizes, jax.devices()[:num_devices]),
            dtype=args.dtype,
            weights=args.weights,
            batch=args.batch,
            context=args.context,
            device_memory_bytes=int(args.device_memory_gib * GIB),
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    report = dict(preset=args.preset, **plan.to_json())
    if args.json:
        print(json.dumps(report))
        return 0
    print(
        f"{args.preset}: {plan.total_params:,} parameters ({args.dtype}, routed experts {plan.weights}) on mesh "
        f"{plan.mesh}; "
        f"batch {plan.batch} x context {plan.context}"
    )
    print(f"{'devices':>12} {'params GiB':>11} {'experts GiB':>12} {'cache GiB':>10} {'total GiB':>10}  fits")
    for first, last, row in _runs(plan.devices):
        label = f"{first}" if first == last else f"{first}-{last}"
        fits = "yes" if row.total_bytes <= plan.device_memory_bytes else "NO"
        print(
            f"{label:>12} {row.param_bytes / GIB:11.2f} {row.expert_param_bytes / GIB:12.2f} "
            f"{row.cache_bytes / GIB:10.2f} {row.total_bytes / GIB:10.2f}  {fits}"
        )
    verdict = "fits" if plan.fits else "does NOT fit"
    margin = (plan.device_memory_bytes - plan.max_device_bytes) / GIB
    print(
        f"busiest device: {plan.max_device_bytes / GIB:.2f} of {args.device_memory_gib:g} GiB: {verdict} "
        f"(margin {margin:.2f} GiB)"
    )
    return 0


def _runs(devices):
    """Consecutive devices with identical figures, as (first, last, row)."""
    runs = []
    for row in devices:
        key = (row.param_bytes, row.expert_param_bytes, row.cache_bytes)
        if runs and runs[-1][3] == key and runs[-1][1] == row.device - 1:
            runs[-1][1] = row.device
        else:
            runs.append([row.device, row.device, row, key])
    return [(first, last, row) for first, last, row, _ in runs]


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
