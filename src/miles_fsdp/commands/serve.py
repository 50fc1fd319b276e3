"""`miles-fsdp serve --model DIR`: a standalone rollout server over HTTP.

    miles-fsdp serve --model ckpt/ --port 8000 --engine.kv-memory-bytes 2000000000
    curl localhost:8000/v1/completions -d '{"model": "ckpt", "prompt": "1+1=", "max_tokens": 8}'

Endpoints: OpenAI /v1/completions, /v1/chat/completions, /v1/models; native /generate;
/update_weights {"path": DIR, "version": N}; /health; Prometheus /metrics.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from miles_fsdp.engine.config import EngineConfig

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class ServeConfig:
    model: str
    """HF checkpoint directory: config.json, *.safetensors and (unless --tokenizer) the tokenizer."""
    host: str = "127.0.0.1"
    """Address to bind; 0.0.0.0 exposes the server to the network."""
    port: int = 8000
    """TCP port; 0 picks a free one."""
    served_model_name: str = ""
    """Name clients pass as `model`; empty means the checkpoint directory's name."""
    tokenizer: str = ""
    """Tokenizer directory; empty means --model."""
    device: str = "auto"
    """'auto' (cuda if available, else cpu), 'cpu', 'cuda' or 'cuda:N'."""
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """Weights and KV cache dtype (the trainer hands the engine bf16 weights)."""
    max_n: int = 64
    """Largest `n` (samples per prompt) one request may ask for."""
    default_max_tokens: int = 256
    """Completion length for chat requests that set no max_tokens."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Server and uvicorn log level; 'info' logs one line per request."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Rollout engine settings (KV cache size, batching, prefix cache)."""

    def __post_init__(self):
        if not (Path(self.model) / "config.json").is_file():
            raise ValueError(f"ServeConfig.model={self.model!r}: no config.json there; "
                             "pass an HF checkpoint directory")
        if not 0 <= self.port < 65536:
            raise ValueError(f"ServeConfig.port={self.port}: expected 0..65535 (0 picks a free port)")
        if self.max_n < 1:
            raise ValueError(f"ServeConfig.max_n={self.max_n}: expected >= 1")
        if self.default_max_tokens < 1:
            raise ValueError(f"ServeConfig.default_max_tokens={self.default_max_tokens}: expected >= 1")
        if self.device != "auto" and self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"ServeConfig.device={self.device!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def load_model(path: str, dtype: torch.dtype, device: torch.device, args=None):
    """Build the Transformer on meta (from `args`, else path/config.json) and stream the
    checkpoint into it; a checkpoint that does not fit `args` raises CheckpointError."""
    from miles_fsdp.models import ModelArgs, Transformer, load_hf

    args = args or ModelArgs.from_hf(path)
    with torch.device("meta"):
        model = Transformer(args)
    return load_hf(model, path, dtype=dtype, device=device).eval()


def build_server(cfg: ServeConfig):
    """The FastAPI app for `cfg` (model loaded, engine built, not yet serving)."""
    from transformers import AutoTokenizer

    from miles_fsdp.engine import Engine
    from miles_fsdp.engine.server import ServerLimits, build_app

    dtype, device = DTYPES[cfg.dtype], cfg.resolved_device()
    model = load_model(cfg.model, dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.model)
    engine = Engine(model, tokenizer, cfg.engine)
    limits = ServerLimits(
        model_name=cfg.served_model_name or Path(cfg.model).resolve().name,
        max_model_len=engine.max_model_len,
        vocab_size=model.args.vocab_size,
        max_n=cfg.max_n,
        kv_capacity_tokens=(engine.num_pages - 1) * cfg.engine.page_size,  # page 0 is scratch
        default_max_tokens=cfg.default_max_tokens,
    )

    def load_weights(path: str) -> dict[str, torch.Tensor]:
        # A fresh CPU copy of the served architecture; the engine copies it in between two steps.
        return load_model(path, dtype, torch.device("cpu"), args=model.args).state_dict()

    return build_app(engine, tokenizer, limits, load_weights)


def main(cfg: ServeConfig) -> int:
    import uvicorn

    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build_server(cfg)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level)
    return 0
