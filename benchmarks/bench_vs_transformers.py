"""caee_jax vs transformers on the same random DeepseekV3 weights: decode and prefill tokens/s on CPU.

A small DeepSeek-V3 whose time goes to the MoE layers (hidden 512, 4 layers with the first dense,
64 routed experts top-k 8 + 1 shared, expert width 256, MLA with q_lora 256 / kv_lora 128, 8 heads,
vocab 8192) is built with transformers, saved with `save_pretrained` and loaded with
`caee_jax.load(dir)` (float32, and bfloat16 as an extra row).

- decode (batch 1 and 16, greedy, N new tokens after a 32-token prompt): caee_jax is warmed up once,
  then `generate_with_stats(...).decode_s_per_token` (median jitted step, prefill and compilation
  excluded); transformers is `model.generate(max_new_tokens=N, min_new_tokens=N, do_sample=False)`
  minus a prefill-only run (max_new_tokens=1), divided by N - 1. EOS is disabled on both sides.
  As a cross-check robust to stalls, transformers' median time between steps is also reported
  (a pass-through logits processor notes each step's time).
- prefill (batch 1 x 256 tokens): caee_jax `generate_with_stats(max_new_tokens=1).prefill_s`,
  transformers `generate(max_new_tokens=1)`; both include choosing the first token.

transformers runs with its default experts implementation (`grouped_mm` when torch provides it; the
baseline of the ratios) and with `eager` (a Python loop over hit experts), as a second reference.
Every system is warmed up on every workload first (caee_jax compiles, torch pays first-call costs).
The systems alternate in rounds (the order flips every round); medians over rounds are reported with
the ratios caee_jax / transformers tokens/s. torch runs with 2 threads under `inference_mode`.
Run on an otherwise idle machine: when another process keeps a core busy, torch with 2 threads slows
down 10-60x (a large `spread` shows it); `--threads 1` stays stable then.

    .venv/bin/python benchmarks/bench_vs_transformers.py            # defaults, about 3 minutes on 2 idle cores
    .venv/bin/python benchmarks/bench_vs_transformers.py --json     # one JSON object instead of a table
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax
import numpy as np
import torch
import transformers

import caee_jax


def hf_config(args) -> dict:
    return dict(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        moe_intermediate_size=args.moe_intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        n_shared_experts=1,
        n_routed_experts=args.experts,
        num_experts_per_tok=args.top_k,
        n_group=args.groups,
        topk_group=args.groups // 2 or 1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        first_k_dense_replace=1,
        kv_lora_rank=128,
        q_lora_rank=256,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        max_position_embeddings=1024,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 256,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    )


def make_hf_model(config: dict, seed: int):
    """A random transformers DeepseekV3ForCausalLM (float32, eval), router bias randomised so routing is uneven."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**config)).eval()
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.05 * torch.randn(buffer.shape))
    model.generation_config.eos_token_id = None  # never stop early
    model.generation_config.pad_token_id = 0
    return model


class StepClock:
    """A pass-through logits processor that notes the time of each generation step."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def hf_generate(model, prompts: np.ndarray, new_tokens: int) -> tuple[float, float, np.ndarray]:
    """(wall time of a greedy `generate` of exactly `new_tokens`, median time between decode steps,
    generated ids [B, new_tokens])."""
    from transformers import LogitsProcessorList

    ids = torch.from_numpy(prompts.astype(np.int64))
    clock = StepClock()
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            logits_processor=LogitsProcessorList([clock]),
        )
        seconds = time.perf_counter() - start
    generated = out[:, ids.shape[1] :].numpy()
    assert generated.shape[1] == new_tokens, f"transformers stopped early: {generated.shape}"
    step = float(np.median(np.diff(clock.times))) if new_tokens > 1 else float("nan")
    return seconds, step, generated


def caee_generate(model, prompts: np.ndarray, new_tokens: int) -> caee_jax.Generation:
    gen = caee_jax.generate_with_stats(model, prompts.tolist(), max_new_tokens=new_tokens, stop=())
    assert all(len(t) == new_tokens for t in gen.tokens), "caee_jax stopped early"
    return gen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1024, help="dense-layer MLP width")
    parser.add_argument("--moe-intermediate", type=int, default=256)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--groups", type=int, default=8, help="n_group (topk_group = n_group // 2)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="decode batch sizes")
    parser.add_argument("--prefill-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-bf16", action="store_true", help="skip the caee_jax bfloat16 row")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument(
        "--hf-experts",
        nargs="+",
        help="transformers experts implementations to time; the first is the baseline "
        "(default: transformers' own choice, then eager)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object of results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    log = (lambda *a: None) if args.json else (lambda *a: print(*a, flush=True))

    load_before = os.getloadavg()[0]
    config = hf_config(args)
    hf = make_hf_model(config, args.seed)
    hf_impls = args.hf_experts or list(dict.fromkeys([hf.config._experts_implementation, "eager"]))
    with tempfile.TemporaryDirectory() as directory:
        hf.save_pretrained(directory)
        caee = {"float32": caee_jax.load(directory, dtype="float32")}
        if not args.no_bf16:
            caee["bfloat16"] = caee_jax.load(directory, dtype="bfloat16")
    params = sum(p.numel() for p in hf.parameters())
    log(
        f"model: {params / 1e6:.1f}M params, {args.layers} layers (1 dense), {args.experts} experts top-{args.top_k}, "
        f"hidden {args.hidden}, expert width {args.moe_intermediate}, vocab {args.vocab}; "
        f"transformers {transformers.__version__} attn={hf.config._attn_implementation}, "
        f"experts default={hf.config._experts_implementation}; load average before start {load_before:.2f}"
    )

    rng = np.random.default_rng(args.seed)
    workloads = {f"decode b{b}": rng.integers(2, args.vocab, (b, args.prompt_len)) for b in args.batches}
    workloads["prefill b1"] = rng.integers(2, args.vocab, (1, args.prefill_len))
    n = args.new_tokens

    def measure(system: str, workload: str) -> tuple[float, float, np.ndarray]:
        """(tokens/s of one run, tokens/s from the median decode step, generated ids)."""
        prompts = workloads[workload]
        batch, length = prompts.shape
        if system.startswith("transformers"):
            hf.set_experts_implementation(system.split()[-1])
            if workload.startswith("prefill"):
                seconds, _, ids = hf_generate(hf, prompts, 1)
                return batch * length / seconds, batch * length / seconds, ids
            full, step, ids = hf_generate(hf, prompts, n)
            prefill, _, _ = hf_generate(hf, prompts, 1)
            return batch * (n - 1) / max(full - prefill, 1e-9), batch / step, ids
        model = caee[system.split()[-1]]
        if workload.startswith("prefill"):
            gen = caee_generate(model, prompts, 1)
            rate = batch * length / gen.prefill_s
        else:
            gen = caee_generate(model, prompts, n)
            rate = batch / gen.decode_s_per_token  # already the median step
        return rate, rate, np.asarray(gen.tokens)

    baselines = [f"transformers {impl}" for impl in hf_impls]
    systems = baselines + [f"caee_jax {dtype}" for dtype in caee]
    start = time.perf_counter()
    for system in systems:  # warm-up: caee_jax compiles every shape, transformers pays its first-call costs
        for workload in workloads:
            measure(system, workload)
    log(f"warm-up (caee_jax compilation included): {time.perf_counter() - start:.1f}s")

    rates = {(s, w): [] for s in systems for w in workloads}
    step_rates = {(s, w): [] for s in systems for w in workloads}
    tokens = {}
    for r in range(args.rounds):
        order = systems if r % 2 == 0 else systems[::-1]
        for workload in workloads:
            for system in order:
                rate, step_rate, ids = measure(system, workload)
                rates[system, workload].append(rate)
                step_rates[system, workload].append(step_rate)
                tokens[system, workload] = ids
        log(f"round {r + 1}/{args.rounds} done ({time.perf_counter() - start:.0f}s)")

    median = {key: float(np.median(runs)) for key, runs in rates.items()}
    rows = [
        dict(
            workload=workload,
            system=system,
            tokens_per_s=median[system, workload],
            runs=[float(x) for x in rates[system, workload]],
            spread=float(max(rates[system, workload]) / min(rates[system, workload])),
            step_median_tokens_per_s=float(np.median(step_rates[system, workload])),
            ratio_vs={b: median[system, workload] / median[b, workload] for b in baselines},
            greedy_ids_equal_baseline=float((tokens[system, workload] == tokens[baselines[0], workload]).mean()),
        )
        for workload in workloads
        for system in systems
    ]
    target = next((r for r in rows if r["workload"] == "decode b16" and r["system"] == "caee_jax float32"), None)
    target_ratio = None if target is None else target["ratio_vs"][baselines[0]]
    summary = dict(
        config=config,
        params=params,
        new_tokens=n,
        prompt_len=args.prompt_len,
        prefill_len=args.prefill_len,
        rounds=args.rounds,
        torch_threads=args.threads,
        load_average=dict(before=load_before, after=os.getloadavg()[0]),
        versions=dict(jax=jax.__version__, torch=torch.__version__, transformers=transformers.__version__),
        baseline=baselines[0],
        results=rows,
        decode_b16_target_5x_met=None if target is None else target_ratio >= 5,
    )
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    ratio_heads = "".join(f"{'vs ' + b.split()[-1]:>14}" for b in baselines)
    print(
        f"{'workload':<12}{'system':<26}{'tokens/s':>10}{'spread':>8}{ratio_heads}{'step-median':>13}{'same ids':>10}"
    )
    for r in rows:
        ratios = "".join(f"{r['ratio_vs'][b]:>13.2f}x" for b in baselines)
        same = f"{r['greedy_ids_equal_baseline']:.0%}"
        print(
            f"{r['workload']:<12}{r['system']:<26}{r['tokens_per_s']:>10.1f}{r['spread']:>8.2f}{ratios}"
            f"{r['step_median_tokens_per_s']:>13.1f}{same:>10}"
        )
    print(
        "spread: max/min over rounds (far above 1: other processes competed for the cores; torch with 2 threads "
        "stalls badly then). step-median: batch / median time between decode steps (caee_jax: same as tokens/s). "
        f"load average after: {summary['load_average']['after']:.2f}"
    )
    if target is not None:
        met = "met" if summary["decode_b16_target_5x_met"] else "NOT met"
        print(f"target: caee_jax float32 decode b16 >= 5x {baselines[0]}: {target_ratio:.2f}x, {met}")


if __name__ == "__main__":
    main()
