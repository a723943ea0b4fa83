"""Train the bundled small DeepSeek-V3-architecture model on the Python standard library.

    python -m checkpoints_tools.train_small [--out caee_jax/assets/caee-small] [--steps 2900]

Steps (each resumable; a rerun skips what is done): train a byte-level BPE tokenizer on the training
files; encode the corpus; train with AdamW and DeepSeek-V3's auxiliary-loss-free balancing (after every
step each MoE layer's `e_score_correction_bias` moves by `bias_rate` against the sign of its expert's
load error); export an HF-format checkpoint in bfloat16 with its tokenizer and a held-out evaluation
text. Training state is checkpointed to --work every --save-every steps; killing and rerunning resumes.
Seeded: the same interpreter, seed and step count give the same model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from caee_jax.config import ModelConfig
from caee_jax.experts import ExpertBackend
from caee_jax.files import atomic_write
from caee_jax.model.execution import Execution
from caee_jax.model.layers import random_state
from caee_jax.model.transformer import DeepseekV3
from caee_jax.weights.hf_export import save_hf
from checkpoints_tools import stdlib_corpus

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
HELDOUT_EVAL_CHARS = 120_000


def small_config(vocab_size: int) -> ModelConfig:
    """DeepSeek-V3's architecture at 23M parameters, 19M of them in routed experts (32 x 256 x 256 x 3 x 3)."""
    return ModelConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=1024,
        moe_intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        n_shared_experts=1,
        n_routed_experts=32,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        first_k_dense_replace=1,
        kv_lora_rank=64,
        q_lora_rank=128,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        max_position_embeddings=2048,
        bos_token_id=0,
        eos_token_id=1,
    )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 2900
    batch_size: int = 12
    seq_len: int = 256
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    bias_rate: float = 1e-2
    vocab_size: int = 4096
    seed: int = 0
    save_every: int = 100


def train_tokenizer(files: list[str], vocab_size: int, path: str) -> None:
    """Byte-level BPE (GPT-2 style pre-tokenisation), with BOS/EOS/PAD as ids 0/1/2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((stdlib_corpus.read_text(f) for f in files), trainer, length=len(files))
    _atomic_write(path, tokenizer.to_str())
    _atomic_write(
        os.path.join(os.path.dirname(path), "tokenizer_config.json"),
        json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "add_bos_token": True}, indent=2),
    )


def encode_files(tokenizer_path: str, files: list[str]) -> np.ndarray:
    """Every file as BOS + tokens + EOS, concatenated: uint16 [total tokens]."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(tokenizer_path)
    bos, eos = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
    texts = [stdlib_corpus.read_text(f) for f in files]
    encoded = tokenizer.encode_batch(texts, add_special_tokens=False)
    return np.concatenate([np.array([bos, *e.ids, eos], np.uint16) for e in encoded])


def _atomic_write(path: str, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)


def _save_npz(path: str, **arrays) -> None:
    with atomic_write(path, "wb") as f:
        np.savez(f, **arrays)


def batch_at(tokens: np.ndarray, step: int, cfg: TrainConfig) -> np.ndarray:
    """Random windows [B, T+1] of the token stream; a pure function of (seed, step), so resuming is exact."""
    rng = np.random.default_rng([cfg.seed, step])
    starts = rng.integers(0, len(tokens) - cfg.seq_len - 1, cfg.batch_size)
    return np.stack([tokens[s : s + cfg.seq_len + 1] for s in starts]).astype(np.int32)


def make_train_step(graphdef, optimizer, cfg: TrainConfig, num_experts: int):
    """A jitted step: (params, bias, opt_state, batch) -> (params, bias, opt_state, loss, max/mean load)."""

    def loss_fn(params, bias, batch):
        model = nnx.merge(graphdef, params, bias)
        out = model(batch[:, :-1], execution=Execution(ExpertBackend.CAPACITY))
        loss = optax.softmax_cross_entropy_with_integer_labels(out.logits, batch[:, 1:]).mean()
        return loss, out.routing.topk_ids

    @jax.jit
    def step(params, bias, opt_state, batch):
        (loss, topk_ids), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, bias, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        # Auxiliary-loss-free balancing: per MoE layer, count each expert's tokens and nudge its bias.
        layers = topk_ids.shape[0]
        load = jax.vmap(lambda ids: jnp.bincount(ids.reshape(-1), length=num_experts))(topk_ids)  # [L, E]
        error = load.astype(jnp.float32) - load.mean(axis=-1, keepdims=True)
        bias = jax.tree.map(lambda b: b - cfg.bias_rate * jnp.sign(error).reshape(layers, num_experts), bias)
        imbalance = (load.max(axis=-1) / load.mean(axis=-1)).mean()
        return params, bias, opt_state, loss, imbalance

    return step


def train(tokens: np.ndarray, config: ModelConfig, cfg: TrainConfig, work: str) -> DeepseekV3:
    """Trains (resuming from work/train_state.npz when present) and returns the model."""
    abstract = nnx.eval_shape(lambda: DeepseekV3(config, rngs=nnx.Rngs(cfg.seed)))
    graphdef, params, bias = nnx.split(
        nnx.merge(nnx.graphdef(abstract), random_state(abstract, cfg.seed)), nnx.Param, ...
    )
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, cfg.warmup_steps, cfg.steps, cfg.learning_rate / 10
    )
    optimizer = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=cfg.weight_decay)
    )
    opt_state = optimizer.init(params)
    state_path = os.path.join(work, "train_state.npz")
    start_step, log = 0, []
    if os.path.exists(state_path):
        saved = np.load(state_path)
        leaves, treedef = jax.tree.flatten((params, bias, opt_state))
        leaves = [jnp.asarray(saved[f"leaf_{i}"], dtype=leaf.dtype) for i, leaf in enumerate(leaves)]
        params, bias, opt_state = jax.tree.unflatten(treedef, leaves)
        start_step = int(saved["step"])
        log = json.loads(str(saved["log"]))
        print(f"resuming at step {start_step}")
    step_fn = make_train_step(graphdef, optimizer, cfg, config.n_routed_experts)
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, desc="train", unit="step")
    started = time.perf_counter()
    for step in bar:
        batch = jnp.asarray(batch_at(tokens, step, cfg))
        params, bias, opt_state, loss, imbalance = step_fn(params, bias, opt_state, batch)
        if step % 10 == 0 or step == cfg.steps - 1:
            loss, imbalance = float(loss), float(imbalance)
            log.append({"step": step, "loss": loss, "load_max_over_mean": imbalance})
            bar.set_postfix(loss=f"{loss:.3f}", load=f"{imbalance:.2f}")
        if (step + 1) % cfg.save_every == 0 or step == cfg.steps - 1:
            leaves = jax.tree.leaves((params, bias, opt_state))
            arrays = {f"leaf_{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
            _save_npz(state_path, step=step + 1, log=json.dumps(log), **arrays)
    elapsed = time.perf_counter() - started
    print(f"trained {cfg.steps - start_step} steps in {elapsed / 60:.1f} min")
    _atomic_write(os.path.join(work, "train_log.json"), json.dumps(log))
    return nnx.merge(graphdef, params, bias)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join("caee_jax", "assets", "caee-small"))
    parser.add_argument("--work", default=os.path.join("runs", "train_small"), help="resumable intermediate state")
    for field in dataclasses.fields(TrainConfig):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    args = parser.parse_args(argv)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    os.makedirs(args.work, exist_ok=True)
    train_files, heldout_files = stdlib_corpus.split_files()
    print(
        f"corpus: {len(train_files)} training files, {len(heldout_files)} held-out files "
        f"({stdlib_corpus.stdlib_root()})"
    )

    tokenizer_path = os.path.join(args.work, "tokenizer.json")
    if not os.path.exists(tokenizer_path):
        train_tokenizer(train_files, cfg.vocab_size, tokenizer_path)
    tokens_path = os.path.join(args.work, "train_tokens.npy")
    if not os.path.exists(tokens_path):
        with atomic_write(tokens_path, "wb") as f:
            np.save(f, encode_files(tokenizer_path, train_files))
    tokens = np.load(tokens_path)
    print(f"training tokens: {len(tokens):,}; {cfg.steps} steps x {cfg.batch_size * cfg.seq_len} tokens")

    model = train(tokens, small_config(cfg.vocab_size), cfg, args.work)

    parent = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".staging-", dir=parent)
    save_hf(model, staging, ml_dtypes.bfloat16)
    for name in ("tokenizer.json", "tokenizer_config.json", "train_log.json"):
        shutil.copy(os.path.join(args.work, name), staging)
    with open(os.path.join(staging, "heldout.txt"), "w") as f:
        f.write(stdlib_corpus.concatenated(heldout_files, HELDOUT_EVAL_CHARS))
    with open(os.path.join(staging, "training.json"), "w") as f:
        json.dump(
            {"train": dataclasses.asdict(cfg), "heldout_files": heldout_files, "tokens": int(len(tokens))}, f, indent=2
        )
    os.chmod(staging, 0o755)  # mkdtemp creates it private
    if os.path.exists(args.out):
        shutil.rmtree(args.out)
    os.replace(staging, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
