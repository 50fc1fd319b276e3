"""SFT data: jsonl / parquet records -> TrainSeq with a loss mask on the tokens the model should learn.

Each line is one of
    {"prompt": "...", "response": "..."}   tokens = prompt + response + eos; trains on response + eos
    {"messages": [{"role": ..., "content": ...}, ...]}
                                            rendered with the tokenizer's chat template; trains
                                            on the assistant messages' tokens only
Assistant spans are found by rendering growing prefixes of the conversation: the tokens a
message adds are the tokens of that message (templates that rewrite earlier turns are refused).
"""

from __future__ import annotations

from pathlib import Path

from miles_fsdp.data.datasets import DatasetError as DataError, read_records
from miles_fsdp.train.packing import TrainSeq


def _render(tok, messages: list[dict], generation_prompt: bool = False) -> list[int]:
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _from_messages(tok, messages, where: str) -> TrainSeq:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    tokens: list[int] = []
    mask: list[int] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        ids = _render(tok, messages[: i + 1])
        if ids[: len(tokens)] != tokens:
            raise DataError(
                f"{where}: the chat template renders messages[{i}] by changing earlier turns, so the "
                f"assistant tokens cannot be located; use prompt/response lines for this template"
            )
        n_head = 0
        if m["role"] == "assistant":
            # the "<|im_start|>assistant\n" header is prompt, not something the model must learn
            head = _render(tok, messages[:i], generation_prompt=True) if i else []
            if head[: len(tokens)] == tokens and ids[: len(head)] == head:
                n_head = len(head) - len(tokens)
        new = ids[len(tokens):]
        tokens += new
        mask += [0] * n_head + [int(m["role"] == "assistant")] * (len(new) - n_head)
    return TrainSeq(tokens=tokens, loss_mask=mask)


def _from_prompt_response(tok, row: dict, where: str) -> TrainSeq:
    p, r = row["prompt"], row["response"]
    if not isinstance(p, str) or not isinstance(r, str):
        raise DataError(f"{where}: 'prompt' and 'response' must be strings")
    p_ids = tok(p, add_special_tokens=False)["input_ids"]
    r_ids = tok(r, add_special_tokens=False)["input_ids"]
    if tok.eos_token_id is not None:
        r_ids = r_ids + [tok.eos_token_id]
    return TrainSeq(tokens=p_ids + r_ids, loss_mask=[0] * len(p_ids) + [1] * len(r_ids))


def load_sft_jsonl(path: str | Path, tok, max_seq_len: int, formats: set | None = None) -> list[TrainSeq]:
    """Every record of `path` (.jsonl or .parquet) as a TrainSeq; longer ones are truncated.
    `formats` (if given) collects how prompts were encoded: "chat" (messages) or "plain"."""
    out = []
    for where, row in read_records(str(path)):
        if "messages" in row:
            seq = _from_messages(tok, row["messages"], where)
        elif "prompt" in row and "response" in row:
            seq = _from_prompt_response(tok, row, where)
        else:
            raise DataError(f"{where}: expected keys 'prompt' and 'response', or 'messages'; got {sorted(row)}")
        if formats is not None:
            formats.add("chat" if "messages" in row else "plain")
        seq.tokens, seq.loss_mask = seq.tokens[:max_seq_len], seq.loss_mask[:max_seq_len]
        if sum(seq.loss_mask[1:]) == 0:
            raise DataError(f"{where}: no trainable token (empty response/assistant turn, or truncated away by "
                            f"max_seq_len={max_seq_len})")
        out.append(seq)
    return out
