"""Batched generation: one jitted prefill, then a jitted decode step that donates the latent cache.

Prompts of different lengths are right-padded to a bucket; each sequence keeps its own position, so
padding never reaches attention (slots after a sequence's position are masked, then overwritten).
Shapes depend only on (batch, prompt bucket, cache length): steps never recompile. On a mesh the batch
is sharded over the data axis and every process runs the same calls (multi-host SPMD); sampled ids come
back replicated, so every process sees all of them.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence

import jax.numpy as jnp
import numpy as np

from caee_jax import html
from caee_jax.offload.cache import StepStats
from caee_jax.parallel.placement import batch_sharding, mesh_context, padded_batch, to_mesh
from caee_jax.runtime import steps

PROMPT_BUCKET = 16
CACHE_BUCKET = 64


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclasses.dataclass
class Generation:
    """tokens: generated ids per prompt (stop token excluded); prefill_s: wall time of the prefill call
    (compilation included on first use); decode_step_s: wall time of each decode step (seconds);
    dropped_pairs: routed pairs expert-parallel prefill had no capacity for (0 unless a capacity is set);
    decode_routing: routed pairs, kept pairs (pruning), active experts before and after pruning, each
    summed over decode steps and MoE layers; prefill_offload, decode_offload: an offloaded model's expert
    cache statistics of the prefill and of each decode step (`offload.cache.StepStats`)."""

    tokens: list[list[int]]
    prefill_s: float
    decode_step_s: list[float]
    dropped_pairs: int = 0
    decode_routing: tuple[int, int, int, int] = (0, 0, 0, 0)
    prefill_offload: StepStats | None = None
    decode_offload: list[StepStats] = dataclasses.field(default_factory=list)

    def _repr_html_(self) -> str:
        routed, kept, active, active_kept = self.decode_routing
        rows = [
            ["sequences", len(self.tokens)],
            ["tokens generated", ", ".join(str(len(t)) for t in self.tokens)],
            ["prefill (s, compilation included on first use)", self.prefill_s],
            ["decode steps", len(self.decode_step_s)],
            ["decode ms/token (median, first step skipped)", 1e3 * self.decode_s_per_token],
            ["decode routed pairs / kept", f"{routed} / {kept} ({100 * self.pruned_pair_fraction:.1f}% pruned)"],
            ["decode active experts (summed) before -> after", f"{active} -> {active_kept}"],
        ]
        if self.dropped_pairs:
            rows.append(["expert-parallel dropped pairs", self.dropped_pairs])
        return html.table("Generation", ["", "value"], rows)

    @property
    def pruned_pair_fraction(self) -> float:
        """Share of decode's routed (token, expert) pairs that pruning skipped."""
        routed, kept = self.decode_routing[:2]
        return 1.0 - kept / routed if routed else 0.0

    @property
    def decode_s_per_token(self) -> float:
        """Median decode step time, skipping the first step (it may include compilation)."""
        timed = self.decode_step_s[1:] or self.decode_step_s
        return float(np.median(timed)) if timed else float("nan")


def encode_prompts(model, prompts: Sequence) -> list[list[int]]:
    """Prompts as token-id lists, validated against the vocabulary."""
    if len(prompts) == 0:
        raise ValueError("prompts: empty batch")
    vocab = model.config.vocab_size
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError(f"prompts[{i}] is an empty string: give some text to continue")
            if model.tokenizer is None:
                raise ValueError(f"prompts[{i}] is text but the model has no tokenizer: pass token ids")
            prompt = model.tokenizer.encode(prompt)
        ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError(f"prompts[{i}] is empty")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompts[{i}]: token id {bad[0]} out of range [0, {vocab})")
        out.append(ids)
    return out


def generate_with_stats(
    model,
    prompts: Sequence,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop: Sequence[int] | None = None,
    max_cache_len: int | None = None,
    on_step: Callable[[list[int | None]], None] | None = None,
) -> Generation:
    """Like `generate`, with timings. on_step: called once per sampled position with each prompt's new id
    (None for a prompt that has stopped), while the next decode step runs on the device."""
    steps_of, mesh = _start(model, prompts, max_new_tokens, temperature, top_p, seed, stop, max_cache_len)
    with mesh_context(mesh):
        while True:
            try:
                new = next(steps_of)
            except StopIteration as finished:
                return finished.value
            if on_step is not None:
                on_step(new)


def stream(
    model,
    prompt,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop: Sequence[int] | None = None,
) -> Iterator[str]:
    """Yields the completion of one text prompt (or token-id list) as text pieces, as they are decoded.

    Needs a model with a tokenizer. Pieces are whole UTF-8 characters: a character whose bytes span several
    tokens comes out once its last token is decoded (`tokenizers.decoders.DecodeStream`), so the pieces
    join to `model.tokenizer.decode(ids)`. Arguments as in `generate`. Between pieces no mesh context is
    held: the caller's code runs as it would outside.
    """
    if model.tokenizer is None:
        raise ValueError("stream needs a model with a tokenizer (tokenizer.json); use generate_with_stats(on_step=...)")
    steps_of, mesh = _start(model, [prompt], max_new_tokens, temperature, top_p, seed, stop, None)
    text = model.tokenizer.stream_decoder()
    while True:
        with mesh_context(mesh):
            try:
                new = next(steps_of)[0]
            except StopIteration:
                return
        piece = text(new) if new is not None else None
        if piece:
            yield piece


def _start(model, prompts, max_new_tokens, temperature, top_p, seed, stop, max_cache_len):
    """Checks the arguments and sets up the batch -> (generator of each position's new ids [B] that returns
    the Generation, mesh); iterate it under the mesh context."""
    ids = encode_prompts(model, prompts)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 0 < top_p <= 1:  # NaN fails every comparison, so it is refused here too
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not 0 <= temperature < float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    lengths = np.array([len(p) for p in ids], np.int32)
    needed = int(lengths.max()) + max_new_tokens
    limit = model.config.max_position_embeddings
    cache_len = min(_round_up(needed, CACHE_BUCKET), limit) if max_cache_len is None else max_cache_len
    if needed > min(cache_len, limit):
        raise ValueError(
            f"longest prompt ({lengths.max()} tokens) + max_new_tokens ({max_new_tokens}) = {needed} exceeds "
            f"the cache ({cache_len} slots, max_position_embeddings {limit})"
        )
    stop_ids = set(model.config.eos_ids if stop is None else stop)
    prompt_len = min(_round_up(int(lengths.max()), PROMPT_BUCKET), cache_len)
    mesh = getattr(model, "mesh", None)
    # A batch that does not split over the mesh gets dummy rows (copies of the first prompt) at the end:
    # they run attention but no expert, and their ids and routing are left out (`steps`, `valid`).
    rows = padded_batch(mesh, len(ids))
    padded = ids + [ids[0]] * (rows - len(ids))
    tokens = np.zeros((rows, prompt_len), np.int32)
    for b, p in enumerate(padded):
        tokens[b, : len(p)] = p
    lengths = np.array([len(p) for p in padded], np.int32)
    valid = np.arange(rows) < len(ids)
    args = (model, mesh, tokens, lengths, valid, max_new_tokens, temperature, top_p, seed, stop_ids, cache_len)
    return _generate(*args), mesh


def _generate(model, mesh, tokens, lengths, valid, max_new_tokens, temperature, top_p, seed, stop_ids, cache_len):
    """The decode loop; an offloaded model's expert cache is threaded through and left updated on the model
    (or emptied, matching its host side, if a step fails: its buffer was donated)."""
    manager = model.execution.offload
    try:
        return (
            yield from _decode_loop(
                model, mesh, tokens, lengths, valid, max_new_tokens, temperature, top_p, seed, stop_ids, cache_len
            )
        )
    except BaseException:
        if manager is not None:
            model.expert_cache = manager.empty_cache()
        raise


def _decode_loop(model, mesh, tokens, lengths, valid, max_new_tokens, temperature, top_p, seed, stop_ids, cache_len):
    """tokens [B, T], lengths [B], valid [B] bool (B padded to split over the mesh); yields the new ids of
    the real rows."""
    manager = model.execution.offload
    offload_steps = []
    real = int(valid.sum())
    if mesh is not None:
        tokens, lengths, valid = (to_mesh(a, batch_sharding(mesh, a.ndim)) for a in (tokens, lengths, valid))
    temp, nucleus, seed = np.float32(temperature), np.float32(top_p), np.uint32(seed)
    start = time.perf_counter()
    next_ids, cache, dropped, model.expert_cache = steps.prefill(
        model.graphdef,
        model.state,
        jnp.asarray(tokens),
        jnp.asarray(lengths),
        seed,
        temp,
        nucleus,
        model.expert_cache,
        jnp.asarray(valid),
        cache_len=cache_len,
        execution=model.execution,
    )
    next_host = np.asarray(next_ids)[:real]
    prefill_s = time.perf_counter() - start
    prefill_offload = manager.take_step_stats(model.expert_cache) if manager is not None else None

    positions = jnp.asarray(lengths)
    generated: list[list[int]] = [[] for _ in next_host]
    done = np.zeros(len(next_host), bool)
    step_times = []
    routing_counts = np.zeros(4, np.int64)
    for step in range(max_new_tokens):
        new: list[int | None] = [None] * len(next_host)
        for b, token in enumerate(next_host):
            if done[b]:
                continue
            if int(token) in stop_ids:
                done[b] = True
            else:
                generated[b].append(int(token))
                new[b] = int(token)
        if done.all() or step == max_new_tokens - 1:
            yield new
            break
        start = time.perf_counter()
        next_ids, cache, counts, model.expert_cache = steps.decode_step(
            model.graphdef,
            model.state,
            cache,
            next_ids,
            positions,
            seed,
            np.int32(step + 1),
            temp,
            nucleus,
            model.expert_cache,
            jnp.asarray(valid),
            execution=model.execution,
        )
        yield new  # the caller's use of the new ids overlaps the step just dispatched
        next_host = np.asarray(next_ids)[:real]
        step_times.append(time.perf_counter() - start)
        routing_counts += np.asarray(counts)
        positions = positions + 1
        if manager is not None:
            offload_steps.append(manager.take_step_stats(model.expert_cache))
    counts = tuple(int(c) for c in routing_counts)
    return Generation(generated, prefill_s, step_times, int(dropped), counts, prefill_offload, offload_steps)


def chat_prompt(model, messages, add_generation_prompt: bool = True) -> str:
    """The model's chat template applied to a conversation: a prompt for `generate` or `stream`.

    messages: a user message string, or a list of {"role": "system" | "user" | "assistant", "content": str}
    dicts. The template writes the BOS token itself; encoding the prompt does not add a second one.
    """
    if model.tokenizer is None:
        raise ValueError("chat needs a model with a tokenizer (tokenizer.json) and a chat template")
    return model.tokenizer.apply_chat_template(messages, add_generation_prompt)


def generate(
    model,
    prompts: Sequence,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop: Sequence[int] | None = None,
    max_cache_len: int | None = None,
) -> list[list[int]]:
    """Generates up to `max_new_tokens` ids for each prompt.

    prompts: token-id lists of any lengths (or strings when the model has a tokenizer).
    temperature 0 is greedy; otherwise temperature + top-p sampling seeded by `seed`.
    stop: ids that end a sequence (default: the config's eos); the stop id is not returned.
    max_cache_len: cache slots per sequence (default: prompt + new tokens, rounded up).
    """
    return generate_with_stats(model, prompts, max_new_tokens, temperature, top_p, seed, stop, max_cache_len).tokens
