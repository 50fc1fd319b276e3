"""Prompt datasets from jsonl or parquet, with epochs, seeded shuffling and exact resume.

    file --read/validate--> records --tokenize, length filter--> prompts [M]
    prompts --per-epoch permutation (seed + epoch)--> next_batch(k) -> list[Sample]

Every bad input raises `DatasetError` naming the file, the line (jsonl) or row (parquet),
and what was expected. Prompts over `max_prompt_len` are dropped with a logged count.
"""

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from miles_fsdp.errors import UserError
from miles_fsdp.data.sample import Message, Sample

logger = logging.getLogger(__name__)

Tokenize = Callable[[str | list[Message]], list[int]]
"""Prompt (text or chat messages) -> prompt token ids, chat template applied
(e.g. `miles_fsdp.data.tokenizer.Tokenizer.tokenize_prompt`)."""

SUFFIXES = (".jsonl", ".parquet")


class DatasetError(UserError, ValueError):
    """A data file that cannot be used as is; the message says where and what to fix."""


@dataclass
class DataConfig:
    path: str
    """Prompt file, `.jsonl` (one JSON object per line) or `.parquet`."""
    prompt_key: str = "prompt"
    """Column holding the prompt: a string or a list of {"role", "content"} messages."""
    label_key: str | None = "label"
    """Column holding the reference answer (string or number); None for unlabelled data."""
    metadata_keys: tuple[str, ...] = ()
    """Extra columns copied into `Sample.metadata` for custom rewards and generate hooks."""
    max_prompt_len: int | None = None
    """Drop prompts longer than this many tokens (after the chat template); count is logged."""
    prompts_per_batch: int = 8
    """Prompts per rollout batch (each is sampled n times by the loop)."""
    num_epochs: int = 1
    """Passes over the dataset; a batch may span two epochs."""
    shuffle: bool = True
    """Shuffle each epoch with a permutation seeded by `seed + epoch`."""
    seed: int = 1234

    def __post_init__(self):
        if not self.path:
            raise ValueError("DataConfig.path is empty: set it to a .jsonl or .parquet prompt file")
        if not self.path.endswith(SUFFIXES):
            raise ValueError(f"DataConfig.path={self.path!r}: expected a file ending in {' or '.join(SUFFIXES)}")
        if not self.prompt_key:
            raise ValueError("DataConfig.prompt_key is empty: name the column that holds the prompt")
        for name in ("prompts_per_batch", "num_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"DataConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_prompt_len is not None and self.max_prompt_len < 1:
            raise ValueError(f"DataConfig.max_prompt_len must be >= 1 or None, got {self.max_prompt_len}")
        self.metadata_keys = tuple(self.metadata_keys)


def read_records(path: str) -> list[tuple[str, dict[str, Any]]]:
    """-> [(location, record)], location like "data.jsonl:3" or "data.parquet row 3"."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"{path}: no such file; check the data path")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(p).to_pylist()
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DatasetError(f"{path}: not a readable parquet file ({e})") from None
        records = [(f"{path} row {i}", row) for i, row in enumerate(rows, 1)]
    else:
        records = []
        with open(p, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise DatasetError(f"{path}:{lineno}: not UTF-8 (byte {raw[e.start]:#04x} at byte {e.start + 1} of "
                                       "the line); save the file as UTF-8") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DatasetError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise DatasetError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                records.append((f"{path}:{lineno}", obj))
    if not records:
        raise DatasetError(f"{path}: the file holds no records")
    return records


def _field(where: str, record: dict[str, Any], key: str, config_field: str) -> Any:
    if key not in record:
        raise DatasetError(
            f"{where}: missing key {key!r} (DataConfig.{config_field}); keys present: {sorted(record)}"
        )
    return record[key]


def _check_prompt(where: str, key: str, prompt: Any) -> str | list[Message]:
    if isinstance(prompt, str):
        return prompt
    ok = isinstance(prompt, list) and prompt and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt
    )
    if not ok:
        raise DatasetError(
            f"{where}: {key!r} must be a string or a non-empty list of "
            f'{{"role": str, "content": str}} messages, got {type(prompt).__name__}: {str(prompt)[:80]}'
        )
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def _check_label(where: str, key: str, label: Any) -> str:
    if isinstance(label, bool) or not isinstance(label, str | int | float):
        raise DatasetError(
            f"{where}: label {key!r} must be a string or number, got {type(label).__name__}; "
            "structured answers belong in DataConfig.metadata_keys"
        )
    return str(label)


@dataclass(slots=True)
class _Prompt:
    prompt: str | list[Message]
    label: str | None
    metadata: dict[str, Any]
    prompt_ids: list[int]


class PromptDataset:
    """Prompts with epochs and batches; `next_batch()` returns fresh `Sample`s (status pending)."""

    def __init__(self, config: DataConfig, tokenize: Tokenize):
        self.config = config
        self.prompts: list[_Prompt] = []
        self.num_filtered = 0
        first_dropped = None
        for where, rec in read_records(config.path):
            prompt = _check_prompt(where, config.prompt_key, _field(where, rec, config.prompt_key, "prompt_key"))
            label = None
            if config.label_key is not None:
                label = _check_label(where, config.label_key, _field(where, rec, config.label_key, "label_key"))
            metadata = {k: _field(where, rec, k, "metadata_keys") for k in config.metadata_keys}
            ids = list(tokenize(prompt))
            if config.max_prompt_len is not None and len(ids) > config.max_prompt_len:
                self.num_filtered += 1
                first_dropped = first_dropped or f"{where} ({len(ids)} tokens)"
                continue
            self.prompts.append(_Prompt(prompt, label, metadata, ids))
        if self.num_filtered:
            total = self.num_filtered + len(self.prompts)
            logger.warning(
                "%s: dropped %d of %d prompts longer than max_prompt_len=%d tokens (first: %s)",
                config.path, self.num_filtered, total, config.max_prompt_len, first_dropped,
            )
        if not self.prompts:
            raise DatasetError(
                f"{config.path}: all {self.num_filtered} prompts exceed max_prompt_len={config.max_prompt_len}; "
                "raise DataConfig.max_prompt_len"
            )
        self.epoch = 0
        self.position = 0
        self._order = self._epoch_order(0)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def exhausted(self) -> bool:
        return self.epoch >= self.config.num_epochs

    @property
    def num_batches(self) -> int:
        """Batches of `prompts_per_batch` over all epochs (the last may be short)."""
        total = len(self.prompts) * self.config.num_epochs
        return -(-total // self.config.prompts_per_batch)

    def _epoch_order(self, epoch: int) -> list[int]:
        if not self.config.shuffle:
            return list(range(len(self.prompts)))
        g = torch.Generator().manual_seed(self.config.seed + epoch)
        return torch.randperm(len(self.prompts), generator=g).tolist()

    def next_batch(self, num_prompts: int | None = None) -> list[Sample]:
        """Up to `num_prompts` (default prompts_per_batch) prompts; [] once all epochs are done.

        group_index is the position in the returned batch; call `make_group` for n samples.
        """
        k = self.config.prompts_per_batch if num_prompts is None else num_prompts
        out: list[Sample] = []
        while len(out) < k and not self.exhausted:
            p = self.prompts[self._order[self.position]]
            out.append(
                Sample(prompt=p.prompt, group_index=len(out), label=p.label,
                       prompt_ids=list(p.prompt_ids), metadata=dict(p.metadata))
            )
            self.position += 1
            if self.position == len(self.prompts):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
        return out

    def __iter__(self):
        while batch := self.next_batch():
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position,
                "num_prompts": len(self.prompts), "seed": self.config.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at the exact prompt; refuses a state saved for a different dataset or seed."""
        if state["num_prompts"] != len(self.prompts) or state["seed"] != self.config.seed:
            raise ValueError(
                f"dataset state was saved with {state['num_prompts']} prompts and seed {state['seed']}, "
                f"but {self.config.path} now gives {len(self.prompts)} prompts with seed {self.config.seed}; "
                "resume with the same data file, max_prompt_len and seed"
            )
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._epoch_order(self.epoch)
