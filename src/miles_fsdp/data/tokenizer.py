"""The tokenizer and chat template of a checkpoint directory (local files only).

A thin wrapper over transformers' AutoTokenizer that returns plain `list[int]`, knows the
stop ids (tokenizer EOS plus generation_config.json's eos_token_id, which may be a list),
and fails with one message naming the directory when something is missing.
"""

from __future__ import annotations

import json
from pathlib import Path

from miles_fsdp.data.sample import Message

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class TokenizerError(ValueError):
    """A checkpoint directory without a usable tokenizer or chat template."""


class Tokenizer:
    def __init__(self, hf_tokenizer, path: str | Path, extra_eos_ids: tuple[int, ...] = ()):
        self.hf = hf_tokenizer
        self.path = str(path)
        eos = [hf_tokenizer.eos_token_id] if hf_tokenizer.eos_token_id is not None else []
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys([*eos, *extra_eos_ids]))
        self.pad_token_id: int | None = hf_tokenizer.pad_token_id

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
    return Tokenizer(hf, path, _generation_eos_ids(path))


def _generation_eos_ids(path: Path) -> tuple[int, ...]:
    file = path / "generation_config.json"
    if not file.is_file():
        return ()
    try:
        eos = json.loads(file.read_text()).get("eos_token_id")
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{file}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)
