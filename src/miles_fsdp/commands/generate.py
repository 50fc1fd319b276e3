"""`miles-fsdp generate`: sample completions from an HF checkpoint with the rollout engine.

    prompts --(plain or chat template)--> ids --engine (paged KV, prefix cache, continuous batching)-->
      token ids + the logprob of each token under the distribution it was sampled from

Greedy at temperature 0, else Gumbel-max over top-k/top-p filtered logits / T, with prompt i
seeded by seed + i (a prompt's output does not depend on the others). Text prompts are
encoded the way the checkpoint was trained (`Tokenizer.text_prompt_format`; --prompt-format
overrides), and the choice is logged to stderr. Example:
    miles-fsdp generate --model ckpt/ --prompt "What is 2+2?" --prompt "And 3+3?" --max-new-tokens 16 --json
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Annotated, Literal

import tyro

from miles_fsdp.device import DTYPES, check_device, resolve_device, resolve_dtype
from miles_fsdp.engine.offline import generate_from_prompts
from miles_fsdp.errors import UserError
from miles_fsdp.models import ModelArgs, Transformer, load_model


class GenerateError(UserError, ValueError):
    """Prompts that cannot be generated from as given; the message says what to change."""


@dataclass
class GenerateConfig:
    model: str = ""
    """HF checkpoint directory (config.json, *.safetensors, tokenizer files)."""
    prompt: Annotated[list[str], tyro.conf.UseAppendAction] = field(default_factory=list)
    """A text prompt; repeat the flag for several (--prompt A --prompt B), generated in order."""
    prompt_ids: str = ""
    """Prompts given as token ids: "1,2,3"; separate several prompts with ";" ("1,2;7,8")."""
    prompt_format: Literal["auto", "plain", "chat"] = "auto"
    """How text prompts are encoded: "plain" (as is, like a string prompt in rl/sft/eval data),
    "chat" (one user message through the chat template), or "auto": what the checkpoint's
    generation_config.json records as "prompt_format", else "chat" when the tokenizer has a
    chat template and "plain" when it has none."""
    max_new_tokens: int = 32
    """Tokens to generate per prompt at most (stops earlier at an EOS token)."""
    temperature: float = 0.0
    """Sampling temperature; 0 means greedy (argmax), logprobs then at temperature 1."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens with this much probability."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = all)."""
    seed: int = 0
    """Sampling seed; prompt i uses seed + i, so a prompt's output does not depend on the others."""
    json: bool = False
    """Print one JSON object per prompt (token_ids, logprobs, text, finish_reason)."""
    device: str = "auto"
    """"auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:1", ..."""
    dtype: str = "auto"
    """Weights and activations: "auto" (bfloat16 on cuda, float32 on cpu), "float32", "bfloat16", "float16"."""

    def __post_init__(self):
        if not self.model:
            raise ValueError("GenerateConfig.model is empty: pass --model <HF checkpoint dir>")
        if self.max_new_tokens < 1:
            raise ValueError(f"GenerateConfig.max_new_tokens={self.max_new_tokens}: must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"GenerateConfig.temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"GenerateConfig.top_p={self.top_p}: must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"GenerateConfig.top_k={self.top_k}: must be >= 0 (0 = no top-k)")
        check_device(self.device, "GenerateConfig.device")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"GenerateConfig.dtype={self.dtype!r}: expected 'auto' or one of {sorted(DTYPES)}")
        self.parsed_prompt_ids()  # fail early on malformed ids

    def parsed_prompt_ids(self) -> list[list[int]]:
        out = []
        for i, part in enumerate(p for p in self.prompt_ids.split(";") if p.strip()):
            try:
                out.append([int(t) for t in part.split(",")])
            except ValueError:
                raise ValueError(
                    f"GenerateConfig.prompt_ids: prompt {i} {part!r} is not comma-separated integers (e.g. 1,2,3)"
                ) from None
        return out


@dataclass
class Completion:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    """fp32 logprob of each token under the distribution it was sampled from."""
    finish_reason: str = "length"  # "stop" (EOS) or "length" (max_new_tokens)


def generate(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    stop_ids: tuple[int, ...] = (),
) -> list[Completion]:
    """One completion per prompt, sampled by the rollout engine (prompt i with seed + i)."""
    args: ModelArgs = model.args
    for i, p in enumerate(prompts):
        if not p:
            raise GenerateError(f"prompt {i} is empty: give at least one token")
        if bad := [t for t in p if not 0 <= t < args.vocab_size]:
            raise GenerateError(f"prompt {i}: token ids {bad[:5]} outside the vocabulary [0, {args.vocab_size})")
        if len(p) + max_new_tokens > args.max_position_embeddings:
            raise GenerateError(
                f"prompt {i}: {len(p)} tokens + max_new_tokens {max_new_tokens} (--max-new-tokens) exceeds the model's "
                f"max_position_embeddings {args.max_position_embeddings}"
            )
    results = generate_from_prompts(model, prompts, max_new_tokens, temperature, top_p, top_k, seed, stop_ids)
    return [Completion(list(r.token_ids), r.logprobs.tolist(), r.finish_reason.value) for r in results]


def main(cfg: GenerateConfig) -> list[Completion]:
    from pathlib import Path

    from miles_fsdp.data.tokenizer import load_tokenizer

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    args = ModelArgs.from_hf(cfg.model)
    has_tokenizer = any((Path(cfg.model) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    tok = load_tokenizer(cfg.model) if has_tokenizer else None
    if cfg.prompt and tok is None:
        raise GenerateError(f"{cfg.model}: has no tokenizer, so text --prompt cannot be encoded; "
                            "use --prompt-ids 1,2,3")
    fmt = _text_format(cfg, tok) if cfg.prompt else "plain"
    prompts = [tok.encode_text_prompt(p, fmt) for p in cfg.prompt] + cfg.parsed_prompt_ids()
    if not prompts:
        raise GenerateError("no prompts: pass --prompt TEXT (repeatable) or --prompt-ids 1,2,3")

    model = load_model(cfg.model, dtype, device, args=args).eval()
    stop_ids = set(tok.eos_token_ids if tok else ())
    eos = args.hf_config.get("eos_token_id")
    stop_ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])

    results = generate(model, prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k, cfg.seed,
                       tuple(sorted(stop_ids)))
    for i, r in enumerate(results):
        text = tok.decode(r.token_ids) if tok else None
        if cfg.json:
            print(json.dumps({"prompt_index": i, "token_ids": r.token_ids, "logprobs": r.logprobs,
                              "text": text, "finish_reason": r.finish_reason}))
        else:
            print(f"--- prompt {i} ({r.finish_reason}, {len(r.token_ids)} tokens)")
            print(text if text is not None else r.token_ids)
    return results


def _text_format(cfg: GenerateConfig, tok) -> str:
    """The format of text prompts for this run; says on stderr which one and how to switch."""
    if cfg.prompt_format == "auto":
        fmt, why = tok.text_prompt_format()
    else:
        fmt, why = cfg.prompt_format, f"--prompt-format {cfg.prompt_format}"
    if fmt == "chat" and not tok.chat_template:
        raise GenerateError(f"--prompt-format chat: {cfg.model} has no chat template; use --prompt-format plain")
    other = "plain" if fmt == "chat" else "chat"
    how = "through the chat template" if fmt == "chat" else "as plain text, no chat template"
    print(f"generate: text prompts encoded {how} ({why}); --prompt-format {other} to change", file=sys.stderr)
    return fmt
