"""Streaming: `caee_jax.stream` yields text pieces that join to the generated text (characters split across
byte-level BPE tokens included), `generate_with_stats(on_step=...)` sees every new id as it is sampled, and
launch/run.py prints the completion as it is decoded."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import caee_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bundled():
    return caee_jax.load()


def test_stream_pieces_join_to_the_generated_text(bundled):
    prompt = "def fibonacci(n):\n"
    pieces = list(caee_jax.stream(bundled, prompt, max_new_tokens=24))
    ids = caee_jax.generate(bundled, [prompt], max_new_tokens=24)[0]
    assert len(pieces) > 1 and all(pieces)
    assert "".join(pieces) == bundled.tokenizer.decode(ids)


def test_stream_decoder_holds_a_character_until_its_last_byte(bundled):
    text = "héllo 世界 🙂 x"
    ids = bundled.tokenizer.encode(text)[1:]  # without BOS
    decode = bundled.tokenizer.stream_decoder()
    pieces = [decode(i) for i in ids]
    assert len(ids) > len(text.split()) and None in pieces  # some characters span several ids
    assert "".join(p for p in pieces if p) == text
    assert "\ufffd" not in "".join(p for p in pieces if p)


def test_on_step_sees_each_new_id_and_none_after_stop(bundled):
    prompts = ["import os", "class A:"]
    free = caee_jax.generate(bundled, prompts, max_new_tokens=10, stop=[])
    stop = free[0][3]
    seen = []
    result = caee_jax.generate_with_stats(bundled, prompts, max_new_tokens=10, stop=[stop], on_step=seen.append)
    for b, tokens in enumerate(result.tokens):
        column = [step[b] for step in seen]
        assert tokens == (free[b][: free[b].index(stop)] if stop in free[b] else free[b])
        assert [t for t in column if t is not None] == tokens
        first_none = column.index(None) if None in column else len(column)
        assert all(t is None for t in column[first_none:])
    assert len(result.tokens[0]) <= 3 < len(free[0])


def test_stream_needs_a_tokenizer():
    with pytest.raises(ValueError, match="tokenizer"):
        next(caee_jax.stream(caee_jax.init_random("tiny"), [1, 2, 3]))


def test_run_py_streams_the_completion():
    command = [sys.executable, "launch/run.py", "--prompt", "import os\n", "--max-new-tokens", "8"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    model = caee_jax.load()
    expected = model.tokenizer.decode(caee_jax.generate(model, ["import os\n"], max_new_tokens=8)[0])
    assert f"--- prompt ---\nimport os\n\n--- completion ---\n{expected}\nmodel: bundled caee-small" in result.stdout
