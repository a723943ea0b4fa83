"""Chat prompts: a checkpoint's chat template rendered with Jinja2 in a sandbox, as transformers renders it.

The template comes from `chat_template.jinja` or the `chat_template` field of `tokenizer_config.json`
(a string, or a list of named templates: "default" is used). It is rendered in Jinja2's
`ImmutableSandboxedEnvironment` with transformers' settings (trim_blocks, lstrip_blocks, loop controls,
the `tojson` filter, `raise_exception`, `strftime_now`), given `messages`, `add_generation_prompt`
and the checkpoint's special tokens (`bos_token`, `eos_token`, ...). A template that does not compile
or fails to render is a ValueError naming its file.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Sequence
from typing import NamedTuple

import jinja2
import jinja2.ext
import jinja2.sandbox


class ChatTemplate(NamedTuple):
    """source: the file it came from (for errors); text: the Jinja2 source; special_tokens: name -> token
    text (bos_token, eos_token, ...), passed to the template as variables."""

    source: str
    text: str
    special_tokens: dict[str, str]


def read_template(directory: str, settings: dict) -> ChatTemplate | None:
    """The directory's chat template (`settings` is its parsed tokenizer_config.json), or None."""
    special = {}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        token = settings.get(name)
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str):
            special[name] = token
    jinja_path = os.path.join(directory, "chat_template.jinja")
    if os.path.exists(jinja_path):
        with open(jinja_path) as f:
            return ChatTemplate(jinja_path, f.read(), special)
    source = os.path.join(directory, "tokenizer_config.json")
    template = settings.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise ValueError(f"{source}: chat_template is a list without a 'default' template ({sorted(named)})")
        template = named["default"]
    if template is None:
        return None
    if not isinstance(template, str):
        raise ValueError(f"{source}: chat_template must be a string, got {type(template).__name__}")
    return ChatTemplate(source, template, special)


def as_messages(messages) -> list[dict]:
    """A user message string, or a list of {"role": str, "content": str, ...} dicts, checked."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages: give a string or a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"messages[{i}]: expected a dict with a string 'role', got {message!r}")
        if not isinstance(message.get("content"), str) and "tool_calls" not in message:
            raise ValueError(f"messages[{i}] (role {message['role']!r}): 'content' must be a string")
    if all(not m["content"] for m in messages if isinstance(m.get("content"), str)):
        raise ValueError("messages: every message is empty: give some text")
    return list(messages)


def render(template: ChatTemplate, messages, add_generation_prompt: bool = True) -> str:
    """The conversation as the model's prompt text (its BOS token included when the template writes it)."""
    messages = as_messages(messages)
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    try:
        compiled = environment.from_string(template.text)
    except jinja2.TemplateSyntaxError as error:
        raise ValueError(f"{template.source}: chat_template does not compile: line {error.lineno}: {error}") from None
    try:
        return compiled.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **template.special_tokens
        )
    except Exception as error:  # the template is the checkpoint's code: any failure is the template's
        raise ValueError(
            f"{template.source}: chat_template failed to render: {type(error).__name__}: {error}"
        ) from None


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.datetime.now().strftime(format)
