"""Plans an EPLB placement (redundant expert replicas) from measured expert loads and saves it beside the model.

    python launch/plan_eplb.py --slots 40 --shards 2                   # bundled model: caee-small/eplb_placement.npz
    python launch/plan_eplb.py --model DIR --slots 288 --shards 8 --out DIR/eplb_placement.npz
    python launch/plan_eplb.py --slots 64 --shards 2 --cost-table TABLE.json   # speed-aware (a slow shard)

The loads are the routed-token counts per MoE layer and expert in --loads (an expert_means.npz written by
launch/calibrate_means.py on calibration text; default: the model directory's). DeepSeek's balancing
(caee_jax/parallel/eplb.py) gives each MoE layer --slots physical slots over --shards expert shards (the
expert axis of the mesh the model will run on); the file is checked against the model and the mesh when
loaded (launch/run.py --eplb-placement FILE, caee_jax.load(..., placement=FILE)). With --cost-table (a
calibrated table of that mesh, e.g. one with a slowed process), each shard is weighed by its cost and a
slower shard routes fewer of its slots (`eplb.balance`'s device_cost). Prints each layer's busiest shard's
predicted share of the loads, before (one slot per expert) and after; speed-aware, weighed by its cost
(against the ideal 100% / sum(1 / cost)).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import caee_jax
from caee_jax import cli
from caee_jax.caee import expert_means
from caee_jax.caee.cost_table import load_table
from caee_jax.config import ModelConfig
from caee_jax.eval.user_files import UserFileError, check_writable
from caee_jax.parallel import eplb, eplb_plan


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    parser.add_argument("--slots", type=int, required=True, help="physical expert slots per MoE layer")
    parser.add_argument("--shards", type=int, required=True, help="expert shards of the mesh it will run on")
    parser.add_argument(
        "--loads", help="expert_means.npz with the routed-token counts (default: MODEL/expert_means.npz)"
    )
    parser.add_argument(
        "--cost-table", help="speed-aware: weigh each shard by its cost in this calibrated table of the same mesh"
    )
    parser.add_argument("--out", help="the .npz file to write (default: MODEL/eplb_placement.npz)")
    cli.add_debug_flag(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    model_dir = args.model or caee_jax.api.BUNDLED_MODEL
    out = args.out or eplb_plan.default_path(model_dir)
    try:
        config = ModelConfig.from_hf(model_dir)
        check_writable(out, "--out")
        loads = expert_means.read(args.loads or expert_means.default_path(model_dir), config)
        if args.shards < 1:
            raise ValueError(f"--shards {args.shards}: must be >= 1")
        table = None if args.cost_table is None else load_table(args.cost_table)
        cost = np.ones(args.shards) if table is None else eplb_plan.device_costs(table, args.shards)
        placement = eplb_plan.from_loads(loads.counts, config, args.slots, args.shards, cost)
    except (ValueError, UserFileError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    eplb_plan.save(out, placement, config, loads.counts, loads.tokens, cost)
    counts = loads.counts.astype(np.float64)
    share = 100 / np.maximum(counts.sum(1), 1)
    before = (eplb.contiguous(*counts.shape, args.shards).device_load(counts) * cost).max(1) * share
    after = (placement.device_load(counts) * cost).max(1) * share
    print(f"wrote {out}: {config.num_moe_layers} MoE layers, {args.slots} slots for {config.n_routed_experts} experts")
    if args.cost_table:
        print(f"shard costs {np.round(cost, 2).tolist()} (from {args.cost_table})")
    print(f"busiest of {args.shards} shard(s), % of a layer's routed pairs ({loads.tokens:,} calibration tokens):")
    for layer, (was, now) in enumerate(zip(before, after, strict=True)):
        print(f"  MoE layer {layer}: {was:.1f}% -> {now:.1f}% (even: {100 / (1 / cost).sum():.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
