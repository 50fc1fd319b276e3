"""The tokenizer and chat template of a checkpoint directory (local files only).

A thin wrapper over transformers' AutoTokenizer that returns plain `list[int]`, knows the
stop ids (tokenizer EOS plus generation_config.json's eos_token_id, which may be a list),
and fails with one message naming the directory when something is missing.

Prompt formats. Dataset prompts (rl, sft, eval) carry their format: a string is encoded as
is ("plain"), a list of messages goes through the chat template ("chat"). A bare text
prompt (`generate --prompt`) does not, so `text_prompt_format` decides it per checkpoint:
    generation_config.json {"prompt_format": "plain" | "chat"}   what the checkpoint was trained
                                                                  on, when its maker recorded it
    else: "chat" if the tokenizer has a chat template, "plain" if it has none
A trainer records the format of its data with `record_prompt_format(export_dir, ...)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from miles_fsdp.errors import UserError
from miles_fsdp.data.sample import Message

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
PROMPT_FORMATS = ("plain", "chat")
PromptFormat = Literal["plain", "chat"]
PROMPT_FORMAT_KEY = "prompt_format"
"""generation_config.json key: how the checkpoint's training data encoded text prompts."""


class TokenizerError(UserError, ValueError):
    """A checkpoint directory without a usable tokenizer or chat template."""


class Tokenizer:
    def __init__(self, hf_tokenizer, path: str | Path, extra_eos_ids: tuple[int, ...] = (),
                 recorded_prompt_format: PromptFormat | None = None):
        self.hf = hf_tokenizer
        self.path = str(path)
        eos = [hf_tokenizer.eos_token_id] if hf_tokenizer.eos_token_id is not None else []
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys([*eos, *extra_eos_ids]))
        self.pad_token_id: int | None = hf_tokenizer.pad_token_id
        self.recorded_prompt_format = recorded_prompt_format
        """generation_config.json's "prompt_format", if the checkpoint records one."""

    @property
    def chat_template(self) -> str | None:
        return self.hf.chat_template

    def __len__(self) -> int:
        return len(self.hf)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[Message], add_generation_prompt: bool = True, tokenize: bool = True, **kwargs
    ) -> list[int] | str:
        """Render messages with the checkpoint's template; token ids, or the text if tokenize=False.

        kwargs go to the template (e.g. `enable_thinking=False` for Qwen3)."""
        if not self.hf.chat_template:
            raise TokenizerError(
                f"{self.path}: the tokenizer has no chat template (no 'chat_template' in tokenizer_config.json "
                "and no chat_template.jinja); pass plain-text prompts or add a template to the checkpoint"
            )
        text = self.hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )
        # the template already wrote BOS/special tokens as text
        return self.encode(text) if tokenize else text

    def tokenize_prompt(self, prompt: str | list[Message]) -> list[int]:
        """Dataset prompt -> ids: chat messages through the template, plain text as is."""
        return self.encode(prompt) if isinstance(prompt, str) else self.apply_chat_template(prompt)

    def text_prompt_format(self) -> tuple[PromptFormat, str]:
        """How a bare text prompt should be encoded for this checkpoint, and why (for a log line)."""
        if self.recorded_prompt_format is not None:
            return self.recorded_prompt_format, (f"its generation_config.json records "
                                                 f"{PROMPT_FORMAT_KEY}={self.recorded_prompt_format!r}")
        if self.chat_template:
            return "chat", "its tokenizer has a chat template"
        return "plain", "its tokenizer has no chat template"

    def encode_text_prompt(self, text: str, fmt: PromptFormat) -> list[int]:
        """'plain': the text as is; 'chat': one user message through the chat template."""
        return self.apply_chat_template([{"role": "user", "content": text}]) if fmt == "chat" else self.encode(text)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load the tokenizer in checkpoint dir `path` without touching the network."""
    path = Path(path)
    if not path.is_dir():
        raise TokenizerError(f"{path}: not a directory; pass the checkpoint directory that holds the tokenizer")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise TokenizerError(
            f"{path}: no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)}); "
            "copy the tokenizer of the base model into this directory"
        )
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises many types; name the dir and keep the cause
        raise TokenizerError(f"{path}: could not load the tokenizer: {e}") from e
    gen = _generation_config(path)
    eos = gen.get("eos_token_id")
    eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)
    fmt = gen.get(PROMPT_FORMAT_KEY)
    if fmt is not None and fmt not in PROMPT_FORMATS:
        raise TokenizerError(f"{path / 'generation_config.json'}: {PROMPT_FORMAT_KEY}={fmt!r}; "
                             f"expected one of {PROMPT_FORMATS} (or no such key)")
    return Tokenizer(hf, path, eos_ids, fmt)


def prompt_format_of(prompts) -> PromptFormat | None:
    """"plain" when every prompt is text, "chat" when every one is a message list, else None."""
    kinds = {"plain" if isinstance(p, str) else "chat" for p in prompts}
    return kinds.pop() if len(kinds) == 1 else None


def record_prompt_format(path: str | Path, fmt: PromptFormat | None) -> None:
    """Write `fmt` as generation_config.json's "prompt_format" in checkpoint dir `path`
    (created if absent), so `generate --prompt` encodes text as the training data did."""
    if fmt is None:  # mixed or unknown: leave the decision to the tokenizer
        return
    if fmt not in PROMPT_FORMATS:
        raise ValueError(f"record_prompt_format: {fmt!r} is not one of {PROMPT_FORMATS}")
    file = Path(path) / "generation_config.json"
    config = _generation_config(Path(path))
    file.write_text(json.dumps({**config, PROMPT_FORMAT_KEY: fmt}, indent=2) + "\n")


def _generation_config(path: Path) -> dict:
    file = path / "generation_config.json"
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{file}: invalid JSON at line {e.lineno}: {e.msg}") from None
