"""caee_jax vs transformers on the same random DeepseekV3 weights: decode and prefill tokens/s on CPU.

A small DeepSeek-V3 whose time goes to the MoE layers (hidden 512, 4 layers with the first dense,
64 routed experts top-k 8 + 1 shared, expert width 256, MLA with q_lora 256 / kv_lora 128, 8 heads,
vocab 8192) is built with transformers, saved with `save_pretrained` and loaded with
`caee_jax.load(dir)` (float32, and bfloat16 as an extra row).

- decode (batch 1 and 16, greedy, N new tokens after a 32-token prompt): caee_jax is warmed up once,
  then `generate_with_stats(...).decode_s_per_token` (median jitted step, prefill and compilation
  excluded); transformers is `model.generate(max_new_tokens=N, min_new_tokens=N, do_sample=False)`
  minus a prefill-only run (max_new_tokens=1), divided by N - 1. EOS is disabled on both sides.
- prefill (batch 1 x 256 tokens): caee_jax `generate_with_stats(max_new_tokens=1).prefill_s`,
  transformers `generate(max_new_tokens=1)`; both include choosing the first token.

The systems alternate in rounds (the order flips every round); medians over rounds are reported with
the ratio caee_jax / transformers tokens/s. torch runs with 2 threads under `inference_mode`.

    .venv/bin/python benchmarks/bench_vs_transformers.py            # defaults, about 5 minutes on 2 cores
    .venv/bin/python benchmarks/bench_vs_transformers.py --json     # one JSON object instead of a table
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import jax
import numpy as np
import torch

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


def hf_generate(model, prompts: np.ndarray, new_tokens: int) -> tuple[float, np.ndarray]:
    """Wall time of a greedy `generate` of exactly `new_tokens`, and the generated ids [B, new_tokens]."""
    ids = torch.from_numpy(prompts.astype(np.int64))
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
        )
        seconds = time.perf_counter() - start
    generated = out[:, ids.shape[1] :].numpy()
    assert generated.shape[1] == new_tokens, f"transformers stopped early: {generated.shape}"
    return seconds, generated


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
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-bf16", action="store_true", help="skip the caee_jax bfloat16 row")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object of results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    log = (lambda *a: None) if args.json else (lambda *a: print(*a, flush=True))

    config = hf_config(args)
    hf = make_hf_model(config, args.seed)
    with tempfile.TemporaryDirectory() as directory:
        hf.save_pretrained(directory)
        caee = {"float32": caee_jax.load(directory, dtype="float32")}
        if not args.no_bf16:
            caee["bfloat16"] = caee_jax.load(directory, dtype="bfloat16")
    params = sum(p.numel() for p in hf.parameters())
    log(
        f"model: {params / 1e6:.1f}M params, {args.layers} layers (1 dense), {args.experts} experts top-{args.top_k}, "
        f"hidden {args.hidden}, expert width {args.moe_intermediate}, vocab {args.vocab}; "
        f"transformers experts={hf.config._experts_implementation} attn={hf.config._attn_implementation}"
    )

    rng = np.random.default_rng(args.seed)
    workloads = {f"decode b{b}": rng.integers(2, args.vocab, (b, args.prompt_len)) for b in args.batches}
    workloads["prefill b1"] = rng.integers(2, args.vocab, (1, args.prefill_len))
    n = args.new_tokens

    def measure(system: str, workload: str) -> tuple[float, np.ndarray]:
        """tokens/s of one run, and the generated ids."""
        prompts = workloads[workload]
        batch, length = prompts.shape
        if system == "transformers":
            if workload.startswith("prefill"):
                seconds, ids = hf_generate(hf, prompts, 1)
                return batch * length / seconds, ids
            full, ids = hf_generate(hf, prompts, n)
            prefill, _ = hf_generate(hf, prompts, 1)
            return batch * (n - 1) / max(full - prefill, 1e-9), ids
        model = caee[system.split()[-1]]
        if workload.startswith("prefill"):
            gen = caee_generate(model, prompts, 1)
            return batch * length / gen.prefill_s, np.asarray(gen.tokens)
        gen = caee_generate(model, prompts, n)
        return batch / gen.decode_s_per_token, np.asarray(gen.tokens)

    systems = ["transformers"] + [f"caee_jax {dtype}" for dtype in caee]
    start = time.perf_counter()
    for system in systems[1:]:  # compile every shape once
        for workload in workloads:
            measure(system, workload)
    log(f"caee_jax warm-up (compilation): {time.perf_counter() - start:.1f}s")

    rates = {(s, w): [] for s in systems for w in workloads}
    tokens = {}
    for r in range(args.rounds):
        order = systems if r % 2 == 0 else systems[::-1]
        for workload in workloads:
            for system in order:
                rate, ids = measure(system, workload)
                rates[system, workload].append(rate)
                tokens[system, workload] = ids
        log(f"round {r + 1}/{args.rounds} done ({time.perf_counter() - start:.0f}s)")

    rows = []
    for workload in workloads:
        base = float(np.median(rates["transformers", workload]))
        for system in systems:
            median = float(np.median(rates[system, workload]))
            same = tokens[system, workload] == tokens["transformers", workload]
            rows.append(
                dict(
                    workload=workload,
                    system=system,
                    tokens_per_s=median,
                    runs=[float(x) for x in rates[system, workload]],
                    ratio_vs_transformers=median / base,
                    greedy_tokens_equal=float(same.mean()),
                )
            )
    target = next((r for r in rows if r["workload"] == "decode b16" and r["system"] == "caee_jax float32"), None)
    summary = dict(
        config=config,
        params=params,
        new_tokens=n,
        prompt_len=args.prompt_len,
        prefill_len=args.prefill_len,
        rounds=args.rounds,
        torch_threads=args.threads,
        versions=dict(jax=jax.__version__, torch=torch.__version__, transformers=__import__("transformers").__version__),
        transformers_experts=hf.config._experts_implementation,
        results=rows,
        decode_b16_target_5x_met=None if target is None else target["ratio_vs_transformers"] >= 5,
    )
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"{'workload':<12}{'system':<20}{'tokens/s':>10}{'vs transformers':>17}{'same greedy ids':>17}")
    for r in rows:
        print(
            f"{r['workload']:<12}{r['system']:<20}{r['tokens_per_s']:>10.1f}{r['ratio_vs_transformers']:>16.2f}x"
            f"{r['greedy_tokens_equal']:>17.0%}"
        )
    if target is not None:
        met = "met" if summary["decode_b16_target_5x_met"] else "NOT met"
        print(f"target decode b16 >= 5x transformers (float32): {target['ratio_vs_transformers']:.2f}x, {met}")


if __name__ == "__main__":
    main()
