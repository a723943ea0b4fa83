"""The launchers' offload flags (`launch/run.py`, `launch/eval.py`) and the `Offload` they describe.

--offload host|disk  --store-dir DIR  --cache-experts N|FRACTION  --cache-policy lru|lfu|cost  --no-prefetch
"""

from __future__ import annotations

import argparse
import math

from caee_jax.offload.cache import Offload, Policy

STORE_HELP = "a disk expert store (write one with: python -m checkpoints_tools.expert_store --out DIR)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("offloaded experts (one device)")
    group.add_argument("--offload", choices=["host", "disk"], help="keep routed experts in host RAM or on disk")
    group.add_argument("--store-dir", help=f"with --offload disk: {STORE_HELP}")
    budget = group.add_mutually_exclusive_group()
    budget.add_argument(
        "--cache-experts",
        type=cache_budget,
        help="device cache slots per MoE layer: a count (16) or a fraction of the experts (0.25, the default)",
    )
    budget.add_argument("--cache-bytes", type=byte_size, help="device cache size for all MoE layers, e.g. 512MiB")
    group.add_argument("--cache-policy", choices=Policy.names(), default="lru", help="eviction policy")
    group.add_argument(
        "--no-prefetch", action="store_true", help="no pre-gating: read only what a layer needs, when it needs it"
    )


def cache_budget(text: str) -> int | float:
    """--cache-experts: a whole number >= 1 (slots) or a fraction in (0, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if value >= 1 and value == int(value):
        return int(value)
    if 0 < value < 1:
        return value
    raise argparse.ArgumentTypeError(f"{text!r}: a whole number of experts >= 1, or a fraction in (0, 1)")


def byte_size(text: str) -> int:
    """--cache-bytes: a whole number of bytes with an optional unit (KiB, MiB, GiB; KB, MB, GB), e.g. 512MiB."""
    units = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}
    number = text.strip().lower().removesuffix("b")
    digits = number.rstrip("kmgi")
    unit = number[len(digits) :]
    if not digits.isdigit() or unit not in units or int(digits) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a size such as 536870912, 512MiB or 2GB")
    return int(digits) * units[unit]


def from_args(args: argparse.Namespace) -> Offload | None:
    """The `Offload` of the flags, None without --offload. ValueError for flags that do not fit together."""
    if args.offload is None:
        flags = (
            ("--store-dir", args.store_dir),
            ("--cache-experts", args.cache_experts),
            ("--cache-bytes", args.cache_bytes),
        )
        given = [flag for flag, value in flags if value]
        if given or args.no_prefetch or args.cache_policy != "lru":
            raise ValueError(f"{given[0] if given else 'the cache flags'} need --offload host|disk")
        return None
    if args.offload == "disk" and not args.store_dir:
        raise ValueError(f"--offload disk needs --store-dir DIR, {STORE_HELP}")
    if args.offload == "host" and args.store_dir:
        raise ValueError("--store-dir is for --offload disk")
    budget = args.cache_experts
    return Offload(
        store=args.offload,
        directory=args.store_dir,
        experts=budget if isinstance(budget, int) else None,
        fraction=budget if isinstance(budget, float) else None,
        nbytes=args.cache_bytes,
        policy=args.cache_policy,
        prefetch=not args.no_prefetch,
    )
