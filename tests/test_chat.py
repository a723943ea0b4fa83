"""Chat prompts: the released DeepSeek-R1 chat template renders a known conversation to the string read off
the template, matches transformers' apply_chat_template, and encodes with one BOS; a broken template is one
error naming its file; launch/run.py --chat uses a checkpoint's template."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REFERENCE_DIR

import caee_jax
from caee_jax.runtime.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
    {"role": "user", "content": "And 3+3?"},
]
# Read off the R1 template: BOS, the system prompt, each user turn after <｜User｜>, each assistant turn after
# <｜Assistant｜> without its reasoning (the text before </think> is dropped) and closed by EOS, then the
# generation prompt.
EXPECTED = f"{BOS}You are terse.<｜User｜>2+2?<｜Assistant｜>\n\n4{EOS}<｜User｜>And 3+3?<｜Assistant｜>"


@pytest.fixture(scope="module")
def r1_dir(tmp_path_factory):
    """A directory with the released R1 tokenizer.json and tokenizer_config.json (a temporary copy)."""
    if not os.path.isdir(REFERENCE_DIR):
        pytest.skip("the DeepSeek-R1 reference (../shared/reference/deepseek-r1) is absent")
    directory = tmp_path_factory.mktemp("r1-tokenizer")
    shutil.copy(os.path.join(REFERENCE_DIR, "tokenizer_config.json"), directory)
    with (
        gzip.open(os.path.join(REFERENCE_DIR, "tokenizer.json.gz")) as src,
        open(directory / "tokenizer.json", "wb") as dst,
    ):
        shutil.copyfileobj(src, dst)
    return directory


def test_r1_template_renders_the_conversation(r1_dir):
    tokenizer = Tokenizer.from_dir(str(r1_dir))
    assert tokenizer.apply_chat_template(CONVERSATION) == EXPECTED
    assert tokenizer.apply_chat_template(CONVERSATION[:2], add_generation_prompt=False) == (
        f"{BOS}You are terse.<｜User｜>2+2?"
    )
    assert tokenizer.apply_chat_template("Hi") == f"{BOS}<｜User｜>Hi<｜Assistant｜>"


def test_r1_prompt_encodes_with_one_bos_and_marker_ids(r1_dir):
    tokenizer = Tokenizer.from_dir(str(r1_dir))
    ids = tokenizer.encode(tokenizer.apply_chat_template(CONVERSATION))
    assert ids[0] == tokenizer.bos_id and ids.count(tokenizer.bos_id) == 1
    for marker in ("<｜User｜>", "<｜Assistant｜>", EOS):
        assert tokenizer._tokenizer.token_to_id(marker) in ids
    assert tokenizer.encode("Hi")[0] == tokenizer.bos_id  # a plain prompt still gets its BOS


def test_r1_matches_transformers(r1_dir):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(str(r1_dir))
    tokenizer = Tokenizer.from_dir(str(r1_dir))
    text = reference.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert text == EXPECTED
    assert tokenizer.encode(text) == reference(text, add_special_tokens=False)["input_ids"]


def bundled_with_template(directory, template) -> str:
    """A checkpoint directory: the bundled model's files (linked) with `template` in tokenizer_config.json."""
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        os.symlink(os.path.join(caee_jax.api.BUNDLED_MODEL, name), directory / name)
    with open(os.path.join(caee_jax.api.BUNDLED_MODEL, "tokenizer_config.json")) as f:
        settings = json.load(f)
    (directory / "tokenizer_config.json").write_text(json.dumps(settings | {"chat_template": template}))
    return str(directory)


@pytest.mark.parametrize(
    "template, fragments",
    [
        ("{% for m in messages %}{{ m.content }}", ["does not compile", "line 1"]),
        ("{{ raise_exception('no system role here') }}", ["failed to render", "no system role here"]),
        ("{{ messages[0].content + 1 }}", ["failed to render", "TypeError"]),
    ],
)
def test_a_broken_template_is_one_error_naming_the_file(tmp_path, template, fragments):
    tokenizer = Tokenizer.from_dir(bundled_with_template(tmp_path, template))
    with pytest.raises(ValueError) as error:
        tokenizer.apply_chat_template("hi")
    message = str(error.value)
    assert message.startswith(str(tmp_path / "tokenizer_config.json")) and all(f in message for f in fragments)


def test_messages_are_checked(tmp_path):
    tokenizer = Tokenizer.from_dir(bundled_with_template(tmp_path, "{{ messages[0].content }}"))
    for bad, fragment in (([], "non-empty"), ([{"content": "x"}], r"messages\[0\]"), ("", "empty")):
        with pytest.raises(ValueError, match=fragment):
            tokenizer.apply_chat_template(bad)


def test_run_py_chat_applies_the_template(tmp_path):
    template = "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"
    checkpoint = bundled_with_template(tmp_path, template)
    command = [sys.executable, "launch/run.py", "--checkpoint", checkpoint, "--chat", "hello", "--max-new-tokens", "4"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--- prompt ---\n<|bos|><user>hello\n<assistant>\n--- completion ---\n" in result.stdout


def test_run_py_a_template_that_fails_to_render_is_one_line(tmp_path):
    checkpoint = bundled_with_template(tmp_path, "{{ raise_exception('only user turns') }}")
    command = [sys.executable, "launch/run.py", "--checkpoint", checkpoint, "--chat", "hello"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'tokenizer_config.json'}: chat_template failed to render: TemplateError: only user turns"
    ]
