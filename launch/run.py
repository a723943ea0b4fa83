"""The main job: load a DeepSeek-V3-architecture model and complete a prompt.

    python launch/run.py --checkpoint DIR --prompt "def fib(n):" --max-new-tokens 64
    python launch/run.py --preset tiny --prompt-ids 1,2,3 --json
    python launch/run.py --mesh data=2,expert=4 --coordinator 127.0.0.1:9000 --num-processes 2 --process-id 0
    python launch/run.py --local-processes 2 --slow-process 1:2 --prune caee=0.8   # 2 local processes, one slowed

Pruning: --prune caee=0.8 or --pruning-config FILE; --compensation mean adds calibrated mean expert
outputs for pruned slots (--expert-means FILE, default CHECKPOINT/expert_means.npz); CAEE's
--expert-importance / --layer-sensitivity (or the rule file's fields) read its importance calibration
(--importance FILE, default CHECKPOINT/importance.npz; launch/calibrate_importance.py).

Offloaded experts (one device): --offload host, or --offload disk --store-dir DIR (a store written by
`python -m checkpoints_tools.expert_store`), with --cache-experts N|FRACTION slots per MoE layer and
--cache-policy lru|lfu|cost; --json then reports the cache statistics of every step, and --offload-plot
FILE draws each decode step's fetch vs compute time.

EPLB replicas: --eplb-slots P holds each MoE layer's routed experts in P physical slots (a multiple of the
expert shards), hot experts replicated, balanced for this mesh from the routed-token counts of
--eplb-loads (default CHECKPOINT/expert_means.npz, measured on calibration text by
launch/calibrate_means.py); --eplb-placement FILE uses a saved placement (launch/plan_eplb.py). The
completion is the unplaced model's; CAEE then prices each pair on its replica's device.

Without --checkpoint or --preset it runs the bundled small model (docs/MODEL_CARD.md) on a Python
prompt; --preset NAME runs a random-weight preset instead (a smoke test, not meaningful text).
Multi-host: every process runs this same command with its own --process-id (or none of the three
flags, under a cluster JAX detects itself); the mesh spans every process's devices, and each process
prints the same completion.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import jax

import caee_jax
from caee_jax import cli
from caee_jax.caee import expert_means, importance
from caee_jax.caee.compensation import COMPENSATIONS
from caee_jax.caee.cost_table import CostTableError
from caee_jax.caee.peer_rules import check_top_k
from caee_jax.caee.policy import CAEEConfig
from caee_jax.caee.pruning import uses_mean
from caee_jax.caee.rule_config import load_rule, parse_rule
from caee_jax.calibration.staleness import probe_table, stale_warning
from caee_jax.calibration.tables import select_table
from caee_jax.config import PRESETS, ModelConfig, preset
from caee_jax.eval.offload_timeline import offload_report, plot_timeline
from caee_jax.model.execution import Execution
from caee_jax.offload import options as offload_options
from caee_jax.offload.store import StoreError
from caee_jax.parallel import distributed, eplb_plan
from caee_jax.parallel.expert_parallel import expert_shards
from caee_jax.parallel.mesh import describe
from caee_jax.routing.storage import Storage
from caee_jax.weights.orbax_checkpoint import is_converted, stored_weights

DEFAULT_PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'
DEFAULT_PROMPT_IDS = "0,11,23,5,42,7"
ANY_SETUP_HELP = "use the --cost-table file even if it was calibrated for another setup (mesh, dtype, backend)"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="HF-format checkpoint directory (config.json + *.safetensors)")
    source.add_argument("--preset", choices=sorted(PRESETS), help="random-weight model of a preset")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="prompt text (needs a checkpoint with tokenizer.json)")
    prompt.add_argument("--prompt-ids", type=_token_ids, help="prompt as comma-separated token ids, e.g. 1,2,3")
    prompt.add_argument("--chat", help="a user message, put in the checkpoint's chat template (tokenizer_config.json)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=_temperature, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=_top_p, default=1.0, help="nucleus share, in (0, 1]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument(
        "--weights",
        choices=Storage.names(),
        help="routed experts' storage (fp8: e4m3 + 128x128 block scales); default: --dtype",
    )
    parser.add_argument("--backend", choices=["loop", "dense", "pallas"], default="loop", help="expert backend")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--no-stream", action="store_true", help="print a text completion at the end, not as decoded")
    pruning = parser.add_argument_group("pruning (CAEE or a peer rule)")
    rule = pruning.add_mutually_exclusive_group()
    rule.add_argument("--prune", help="RULE=NUMBER, e.g. caee=0.8 (theta) or top_p=0.9 (knob)")
    rule.add_argument("--pruning-config", help="a YAML rule file, e.g. configs/caee/default.yaml")
    pruning.add_argument("--cost-table", help="cost table JSON for CAEE (default: the stored one of this mesh)")
    pruning.add_argument("--cost-table-any-setup", action="store_true", help=ANY_SETUP_HELP)
    pruning.add_argument("--compensation", choices=COMPENSATIONS, help="overrides the rule's compensation")
    pruning.add_argument("--expert-means", help="for compensation mean (default: CHECKPOINT/expert_means.npz)")
    auto = "default with --prune caee=...: on when the checkpoint has importance.npz"
    for flag, what in (("expert-importance", "expert output norms"), ("layer-sensitivity", "layer sensitivity")):
        pruning.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, help=f"CAEE: weigh by {what} ({auto})")
    pruning.add_argument("--importance", help="CAEE's importance calibration (default: CHECKPOINT/importance.npz)")
    pruning.add_argument(
        "--skip-table-probe", action="store_true", help="do not time a few MoE-layer calls against the cost table"
    )
    offload_options.add_arguments(parser)
    eplb_plan.add_arguments(parser)
    parser.add_argument("--offload-plot", help="with --offload: a PNG of each decode step's fetch vs compute time")
    distributed.add_arguments(parser)
    cli.add_debug_flag(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.local_processes:
        return distributed.relaunch_locally(__file__, argv, args.local_processes, args.slow_process)
    mesh = distributed.join(args)
    start = time.perf_counter()
    try:
        offload = offload_options.from_args(args)
        if offload and args.mesh is None:
            mesh = None  # offloaded experts run on one device: not the default mesh over every device
        if offload and jax.process_count() > 1:
            raise ValueError("offloaded experts run in one process; drop --offload or the multi-process flags")
        execution = _execution(args, mesh)
        if args.offload_plot and not offload:
            raise ValueError("--offload-plot needs --offload host|disk")
        options = dict(dtype=args.dtype, weights=args.weights, execution=execution, mesh=mesh, offload=offload)
        options["placement"] = _placement(args, mesh)
        if args.preset:
            model = caee_jax.init_random(args.preset, seed=args.seed, **options)
            source = f"preset {args.preset} (random weights)"
        else:
            model = caee_jax.load(args.checkpoint, **options)
            source = args.checkpoint or "bundled caee-small"
    except (ValueError, CostTableError, StoreError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        check_top_k(execution.pruning, model.config.num_experts_per_tok)
    except ValueError as error:
        print(f"error: pruning rule: {error}", file=sys.stderr)
        return 2
    if uses_mean(execution.pruning):
        try:
            expert_means.load_means(model, _means_path(args))
        except ValueError as error:
            print(f"error: compensation mean: {error}", file=sys.stderr)
            return 2
    if importance.uses_importance(execution.pruning):
        try:
            importance.load_importance(model, _importance_path(args))
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    load_s = time.perf_counter() - start
    probe = None
    if execution.cost_table is not None and not args.skip_table_probe:
        if model.placement is None:
            probe = _probe_table(model, args)
        elif jax.process_index() == 0:
            print("note: the cost-table probe runs on models without EPLB replicas; skipped", file=sys.stderr)

    if args.prompt_ids is not None:
        prompt = args.prompt_ids
    elif args.prompt is not None:
        prompt = args.prompt
    elif args.chat is not None:
        prompt = caee_jax.chat_prompt(model, args.chat)
    else:
        prompt = DEFAULT_PROMPT if model.tokenizer else [int(t) for t in DEFAULT_PROMPT_IDS.split(",")]

    prompt_text = prompt if isinstance(prompt, str) else None
    streaming = prompt_text is not None and not (args.json or args.no_stream) and jax.process_index() == 0
    try:
        result = caee_jax.generate_with_stats(
            model,
            [prompt],
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            on_step=_printer(model.tokenizer, prompt_text) if streaming else None,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if streaming:
        print(flush=True)
    ids = result.tokens[0]
    text = model.tokenizer.decode(ids) if model.tokenizer else None
    report = {
        "model": source,
        "mesh": describe(mesh) if mesh else None,
        "pruning": repr(execution.pruning) if execution.pruning else None,
        "eplb_slots": None if model.placement is None else model.placement.num_slots,
        "process": jax.process_index(),
        "processes": jax.process_count(),
        "generated_ids": ids,
        "text": text,
        "load_s": load_s,
        "prefill_s": result.prefill_s,
        "decode_s_per_token": result.decode_s_per_token,
        "decode_tokens_per_s": 1.0 / result.decode_s_per_token,
        "decode_routing": dict(
            zip(
                ("routed_pairs", "kept_pairs", "active_experts", "active_experts_kept"),
                result.decode_routing,
                strict=True,
            )
        ),
    }
    if probe is not None:
        report["table_probe"] = dict(ratio=probe.ratio, seconds=probe.seconds, cases=probe.cases, stale=probe.stale)
    manager = model.execution.offload
    if manager is not None:
        report["offload"] = {
            "store": manager.store.tier,
            "slots_per_layer": manager.slots,
            "policy": str(manager.policy),
            "prefetch": manager.prefetch,
        } | offload_report(result.prefill_offload, result.decode_offload, result.decode_step_s)
        if args.offload_plot:
            title = f"{source}: {manager.store.tier} store, {manager.slots} slots per layer, {manager.policy}"
            plot_timeline(result.decode_offload, result.decode_step_s, args.offload_plot, title)
    if args.json:
        print(json.dumps(report), flush=True)
        return 0
    if jax.process_index() != 0:
        return 0
    print(f"model: {source}" + (f" | mesh {report['mesh']} over {jax.process_count()} process(es)" if mesh else ""))
    if execution.pruning:
        routed, kept, active, active_kept = result.decode_routing
        steps = max(len(result.decode_step_s), 1) * (model.config.num_moe_layers or 1)
        print(
            f"pruning: {execution.pruning}\n"
            f"decode: {100 * result.pruned_pair_fraction:.1f}% of {routed} routed pairs skipped; active experts per "
            f"layer and step {active / steps:.1f} -> {active_kept / steps:.1f}"
        )
    if prompt_text is None:
        print(f"prompt ids: {prompt}\ngenerated ids: {ids}" + (f"\ntext: {text!r}" if text is not None else ""))
    elif not streaming:
        print(f"--- prompt ---\n{prompt_text}\n--- completion ---\n{text}")
    if manager is not None:
        total = report["offload"]["decode_total"]
        print(
            f"offload ({manager.store.tier}, {manager.slots} slots per layer, {manager.policy}): decode hit rate "
            f"{100 * total['hit_rate']:.1f}%, {total['blocking_fetches']} blocking + {total['prefetched_fetches']} "
            f"prefetched fetches ({total['bytes_read'] / 2**20:.1f} MiB), {total['pruned_misses']} pruned misses"
        )
    print(
        f"load {load_s:.2f} s | prefill {result.prefill_s:.2f} s (incl. compilation) | "
        f"decode {1e3 * result.decode_s_per_token:.1f} ms/token ({report['decode_tokens_per_s']:.1f} tokens/s)"
    )
    return 0


def _printer(tokenizer, prompt_text: str):
    """The `on_step` callback that prints the prompt at the first step (a refused prompt prints nothing),
    then the completion as it is decoded."""
    decode, started = tokenizer.stream_decoder(), []

    def on_step(new_ids: list[int | None]) -> None:
        if not started:
            print(f"--- prompt ---\n{prompt_text}\n--- completion ---", flush=True)
            started.append(True)
        piece = decode(new_ids[0]) if new_ids[0] is not None else None
        if piece:
            print(piece, end="", flush=True)

    return on_step


def _execution(args, mesh) -> Execution:
    """The backend, plus the pruning rule and (for CAEE) the cost table of this mesh."""
    if args.prune or args.pruning_config:
        rule = parse_rule(args.prune) if args.prune else load_rule(args.pruning_config)
    elif args.compensation or args.expert_means or args.expert_importance or args.layer_sensitivity or args.importance:
        raise ValueError(
            "--compensation, --expert-means, --expert-importance, --layer-sensitivity and --importance need a pruning "
            "rule (--prune or --pruning-config)"
        )
    else:
        return Execution(args.backend)
    if args.compensation:
        rule = dataclasses.replace(rule, compensation=args.compensation)
    if args.expert_means and not uses_mean(rule):
        raise ValueError("--expert-means is only used with compensation mean")
    chosen = dict(expert_importance=args.expert_importance, layer_sensitivity=args.layer_sensitivity)
    if any(chosen.values()) and not isinstance(rule, CAEEConfig):
        raise ValueError("--expert-importance and --layer-sensitivity are CAEE options; the rule is a peer rule")
    if isinstance(rule, CAEEConfig):
        available = bool(args.importance) or (not args.preset and os.path.isfile(_importance_path(args)))
        defaults = available if args.prune else None  # a rule file's own fields stand unless a flag is given
        chosen = {name: defaults if on is None else on for name, on in chosen.items()}
        rule = dataclasses.replace(rule, **{name: on for name, on in chosen.items() if on is not None})
    if args.importance and not importance.uses_importance(rule):
        raise ValueError("--importance is only used with CAEE's --expert-importance or --layer-sensitivity")
    table = None
    if isinstance(rule, CAEEConfig):
        config = (
            preset(args.preset) if args.preset else ModelConfig.from_hf(args.checkpoint or caee_jax.api.BUNDLED_MODEL)
        )
        table = _table(config, mesh, args)
    return Execution(args.backend, pruning=rule, cost_table=table)


def _placement(args, mesh):
    """The EPLB placement the flags ask for (`parallel/eplb_plan.py`), or None."""
    if not (args.eplb_slots or args.eplb_placement or args.eplb_loads or args.eplb_speed_aware):
        return None
    model_dir = None if args.preset else args.checkpoint or caee_jax.api.BUNDLED_MODEL
    config = preset(args.preset) if args.preset else ModelConfig.from_hf(model_dir)
    table = _table(config, mesh, args) if args.eplb_speed_aware else None
    return eplb_plan.from_args(args, config, 1 if mesh is None else expert_shards(mesh), model_dir, table)


def _probe_table(model, args):
    """Times a few MoE-layer calls against the cost table (about a second; every process takes part) and
    warns on stderr when its predictions are off; None for an offloaded model (its experts are not on device)."""
    if model.execution.offload is not None:
        return None
    probe = probe_table(model, model.execution.cost_table)
    source = f"--preset {args.preset}" if args.preset else f"--model {args.checkpoint}" if args.checkpoint else ""
    mesh = f" --mesh {args.mesh}" if args.mesh else ""
    command = f"python launch/calibrate.py {source} --dtype {args.dtype} --backend {args.backend}{mesh}"
    warning = stale_warning(probe, model.execution.cost_table, " ".join(command.split()))
    if warning and jax.process_index() == 0:
        print(warning, file=sys.stderr)
    return probe


def _table(config, mesh, args):
    """The cost table (a setup mismatch is an error naming --cost-table-any-setup)."""
    if args.cost_table_any_setup and not args.cost_table:
        raise ValueError("--cost-table-any-setup needs --cost-table FILE")
    override = args.cost_table_any_setup
    return select_table(
        config, mesh, args.dtype, args.backend, args.cost_table, override=override, weights=_weights(args)
    )


def _weights(args) -> Storage | str | None:
    """The routed experts' storage the loaded model will have: --weights, else a converted checkpoint's
    (fp8 when converted with --keep-fp8), else None (held in --dtype)."""
    if args.weights or args.preset or not args.checkpoint or not is_converted(args.checkpoint):
        return args.weights
    return stored_weights(args.checkpoint)


def _token_ids(text: str) -> list[int]:
    """--prompt-ids: comma-separated whole numbers (the vocabulary range is checked with the model)."""
    parts = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in parts if not t.lstrip("-").isdigit()]
    if bad or not parts:
        raise argparse.ArgumentTypeError(f"{text!r}: {bad[0]!r} is not a token id" if bad else "no token ids")
    return [int(t) for t in parts]


def _temperature(text: str) -> float:
    value = float(text) if _is_float(text) else math.nan
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number >= 0 (0 = greedy)")
    return value


def _top_p(text: str) -> float:
    value = float(text) if _is_float(text) else math.nan
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a number in (0, 1]")
    return value


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _importance_path(args) -> str:
    if args.importance:
        return args.importance
    if args.preset:
        raise ValueError("a --preset model has no importance calibration: pass --importance FILE")
    return importance.default_path(args.checkpoint or caee_jax.api.BUNDLED_MODEL)


def _means_path(args) -> str:
    if args.expert_means:
        return args.expert_means
    if args.preset:
        raise ValueError("a --preset model has no calibrated expert means: pass --expert-means FILE")
    return expert_means.default_path(args.checkpoint or caee_jax.api.BUNDLED_MODEL)


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
