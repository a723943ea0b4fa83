"""Generation: batched prompts of different lengths, parity with transformers' greedy generate,
no recompilation between steps, sampling controls, and input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import compile_counter

import caee_jax


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import make_hf_model

    reference = make_hf_model(seed=11)
    directory = tmp_path_factory.mktemp("gen")
    reference.save_pretrained(directory)
    return caee_jax.load(directory), reference


PROMPTS = [[5, 17, 3, 99, 42, 7, 7], [120], [64, 2, 2, 9, 30, 11, 80, 81, 82, 83, 84, 85, 86, 87, 88, 89, 90, 91]]


def hf_greedy(reference, prompt, new_tokens, eos):
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0
        )
    generated = out[0, len(prompt) :].tolist()
    return generated[: generated.index(eos)] if eos in generated else generated


def test_batched_greedy_matches_transformers_per_prompt(tiny):
    model, reference = tiny
    eos = model.config.eos_token_id
    ours = caee_jax.generate(model, PROMPTS, max_new_tokens=12)
    for prompt, generated in zip(PROMPTS, ours, strict=True):
        assert generated == hf_greedy(reference, prompt, 12, eos)
    assert any(len(g) > 3 for g in ours)


def test_batch_composition_does_not_change_a_sequence(tiny):
    model, _ = tiny
    together = caee_jax.generate(model, PROMPTS, max_new_tokens=8, stop=[])
    alone = [caee_jax.generate(model, [p], max_new_tokens=8, stop=[])[0] for p in PROMPTS]
    assert together == alone
    assert all(len(g) == 8 for g in together)


def test_decode_never_recompiles(tiny):
    """Steps reuse one compiled decode step; a new batch of the same shape bucket compiles nothing."""
    model, _ = tiny
    with compile_counter() as compiles:
        caee_jax.generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=6, stop=[])
        first = len(compiles)
        result = caee_jax.generate(model, [[9, 8, 7, 6], [3]], max_new_tokens=20, temperature=0.7, seed=4, stop=[])
    assert first >= 1
    assert len(compiles) == first, "the second generation (more steps, new tokens, sampling) recompiled"
    assert all(len(r) == 20 for r in result)


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(tiny):
    model, _ = tiny
    kwargs = dict(max_new_tokens=10, stop=[])
    a = caee_jax.generate(model, PROMPTS, temperature=1.5, seed=1, **kwargs)
    assert a == caee_jax.generate(model, PROMPTS, temperature=1.5, seed=1, **kwargs)
    assert a != caee_jax.generate(model, PROMPTS, temperature=1.5, seed=2, **kwargs)
    greedy = caee_jax.generate(model, PROMPTS, **kwargs)
    assert caee_jax.generate(model, PROMPTS, temperature=1.5, top_p=1e-6, seed=3, **kwargs) == greedy


def test_stop_tokens_end_sequences(tiny):
    model, _ = tiny
    free = caee_jax.generate(model, PROMPTS, max_new_tokens=10, stop=[])
    stop = free[0][3]
    stopped = caee_jax.generate(model, PROMPTS, max_new_tokens=10, stop=[stop])
    assert stopped[0] == free[0][: free[0].index(stop)]


def test_generation_reports_timings(tiny):
    model, _ = tiny
    result = caee_jax.generate_with_stats(model, PROMPTS, max_new_tokens=5, stop=[])
    assert result.prefill_s > 0 and len(result.decode_step_s) == 4 and result.decode_s_per_token > 0


@pytest.mark.parametrize(
    "prompts, kwargs, message",
    [
        ([], {}, "empty batch"),
        ([[1, 2], []], {}, r"prompts\[1\] is empty"),
        ([[1, 131]], {}, "token id 131 out of range"),
        ([[-1]], {}, "token id -1 out of range"),
        (["hello"], {}, "no tokenizer"),
        ([[1] * 30], dict(max_new_tokens=5, max_cache_len=32), "exceeds the cache"),
        ([[1] * 250], dict(max_new_tokens=10), "max_position_embeddings 256"),
        ([[1]], dict(top_p=0.0), "top_p"),
    ],
)
def test_bad_input_is_a_clear_error(tiny, prompts, kwargs, message):
    model, _ = tiny
    with pytest.raises(ValueError, match=message):
        caee_jax.generate(model, prompts, **kwargs)


def test_model_call_rejects_bad_tokens(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="out of range"):
        model(np.array([[1, 500]]))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        model(np.array([1, 2]))
    with pytest.raises(ValueError, match="integer"):
        model(np.array([[1.0]]))
