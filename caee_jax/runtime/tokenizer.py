"""Text <-> token ids through a checkpoint's `tokenizer.json` (HF `tokenizers`), and its chat template."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import tokenizers
from tokenizers.decoders import DecodeStream

from caee_jax.runtime import chat


class Tokenizer:
    """encode(text) -> ids (with the BOS token first when the checkpoint asks for it); decode(ids) -> text;
    apply_chat_template(messages) -> prompt text (checkpoints with a chat template)."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        bos_id: int | None,
        add_bos: bool,
        eos_ids: tuple[int, ...],
        chat_template: chat.ChatTemplate | None = None,
        directory: str = "",
    ):
        self._tokenizer = tokenizer
        self.bos_id = bos_id
        self.add_bos = add_bos and bos_id is not None
        self.eos_ids = eos_ids
        self.chat_template = chat_template
        self.directory = directory

    @classmethod
    def from_dir(cls, directory: str, eos_ids: tuple[int, ...] = ()) -> Tokenizer | None:
        """The directory's tokenizer, or None when it has no `tokenizer.json`.

        `tokenizer_config.json` (when present) names the BOS token and whether to prepend it, and may hold
        the chat template (`chat.read_template`).
        """
        path = os.path.join(directory, "tokenizer.json")
        if not os.path.exists(path):
            return None
        try:
            tokenizer = tokenizers.Tokenizer.from_file(path)
        except Exception as e:
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None
        settings = {}
        settings_path = os.path.join(directory, "tokenizer_config.json")
        if os.path.exists(settings_path):
            with open(settings_path) as f:
                settings = json.load(f)
        bos = settings.get("bos_token")
        if isinstance(bos, dict):
            bos = bos.get("content")
        bos_id = tokenizer.token_to_id(bos) if bos else None
        template = chat.read_template(directory, settings)
        return cls(tokenizer, bos_id, bool(settings.get("add_bos_token", False)), eos_ids, template, directory)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in it (a chat template's markers) are their own ids. The
        BOS id is prepended when the checkpoint asks for it, unless the text already begins with it."""
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        if self.add_bos and ids[:1] != [self.bos_id]:
            ids = [self.bos_id, *ids]
        return ids

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        """The prompt text of a conversation: `messages` is a user message string or a list of {"role",
        "content"} dicts; add_generation_prompt ends it with the assistant's turn marker."""
        if self.chat_template is None:
            raise ValueError(
                f"{self.directory}: no chat template (no chat_template in tokenizer_config.json, no "
                "chat_template.jinja): give a plain prompt"
            )
        return chat.render(self.chat_template, messages, add_generation_prompt)

    def decode(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def stream_decoder(self) -> Callable[[int], str | None]:
        """A decoder of one sequence fed one id at a time: each call returns the text that id completes, or
        None while a character's bytes are still incomplete (byte-level BPE splits characters across ids);
        the returned pieces join to `decode` of all the ids."""
        decoder = DecodeStream(skip_special_tokens=True)

        def step(token: int) -> str | None:
            return decoder.step(self._tokenizer, int(token))

        return step
