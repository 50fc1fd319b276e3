"""`miles-fsdp serve --model DIR`: a standalone rollout server over HTTP.

    miles-fsdp serve --model ckpt/ --port 8000 --engine.kv-memory-bytes 2000000000
    curl localhost:8000/v1/completions -d '{"model": "ckpt", "prompt": "1+1=", "max_tokens": 8}'

Endpoints: OpenAI /v1/completions, /v1/chat/completions, /v1/models; native /generate;
/update_weights {"path": DIR, "version": N} (DIR under --weights-root); /health; Prometheus
/metrics. With an API key (MILES_API_KEY or --api-key) every endpoint but /health wants
`Authorization: Bearer KEY`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from miles_fsdp.device import check_device, resolve_device, resolve_dtype
from miles_fsdp.engine.config import EngineConfig

API_KEY_ENV = "MILES_API_KEY"

log = logging.getLogger(__name__)


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
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """Weights and KV cache dtype. auto: the trainer's compute dtype on this device (bfloat16 on
    CUDA, float32 on CPU), which disaggregated rollout needs for bitwise equal log-probs."""
    kernel_mode: Literal["invariant", "fast"] = "invariant"
    """miles_kernels mode the engine thread runs in: invariant (log-probs equal a trainer's bit
    for bit) or fast (vendor kernels; an rl run with --kernel-mode fast)."""
    max_n: int = 64
    """Largest `n` (samples per prompt) one request may ask for."""
    default_max_tokens: int = 0
    """Completion length for requests that set no max_tokens: 0 means all the context leaves
    after the prompt (max_model_len and the KV cache capacity); N > 0 caps that at N."""
    weights_root: str = ""
    """Directory POST /update_weights may load checkpoints from (it and everything below,
    after resolving symlinks and '..'); other paths are refused. Empty means the parent of
    --model (its sibling checkpoints), or no path at all if that parent is '/'. Disaggregated
    rollout: the directory the trainer writes weights to, rollout.weights_dir
    (examples/gsm8k/run_disaggregated.sh passes it)."""
    api_key: str = ""
    """Require `Authorization: Bearer KEY` (the OpenAI client's api_key) on every endpoint but
    /health, which stays open for load balancers; others get 401. Empty means the MILES_API_KEY
    environment variable, or no key if unset. Prefer the variable: a flag shows in `ps`; the
    trainer's rollout client sends MILES_API_KEY too."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Server and uvicorn log level; 'info' logs one line per request."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Rollout engine settings (KV cache size, batching, prefix cache). On CPU with neither
    --engine.kv-memory-bytes nor --engine.num-pages, the KV cache gets 256 MiB (at most a
    quarter of the RAM); the log says what it chose."""

    def __post_init__(self):
        if not (Path(self.model) / "config.json").is_file():
            raise ValueError(f"ServeConfig.model={self.model!r}: no config.json there; "
                             "pass an HF checkpoint directory")
        if not 0 <= self.port < 65536:
            raise ValueError(f"ServeConfig.port={self.port}: expected 0..65535 (0 picks a free port)")
        if self.max_n < 1:
            raise ValueError(f"ServeConfig.max_n={self.max_n}: expected >= 1")
        if self.default_max_tokens < 0:
            raise ValueError(f"ServeConfig.default_max_tokens={self.default_max_tokens}: expected >= 0 "
                             "(0: all the context leaves after the prompt)")
        if self.weights_root and Path(self.weights_root).exists() and not Path(self.weights_root).is_dir():
            raise ValueError(f"ServeConfig.weights_root={self.weights_root!r}: not a directory; pass the "
                             "directory the checkpoints to load are written under")
        check_device(self.device, "ServeConfig.device")

    def resolved_weights_root(self) -> Path | None:
        root = Path(self.weights_root or Path(self.model).resolve().parent).resolve()
        return None if not self.weights_root and root == Path(root.anchor) else root

    def resolved_api_key(self) -> str:
        return self.api_key or os.environ.get(API_KEY_ENV, "")


def build_server(cfg: ServeConfig):
    """The FastAPI app for `cfg` (model loaded, engine built, not yet serving)."""
    from transformers import AutoTokenizer

    from miles_fsdp.engine import Engine
    from miles_fsdp.engine.server import ServerLimits, build_app
    from miles_fsdp.engine.server_weights import check_checkpoint_files
    from miles_fsdp.models import load_model

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    model = load_model(cfg.model, dtype, device).eval()
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.model)
    engine = Engine(model, tokenizer, cfg.engine, kernel_mode=cfg.kernel_mode)
    limits = ServerLimits(
        model_name=cfg.served_model_name or Path(cfg.model).resolve().name,
        max_model_len=engine.max_model_len,
        vocab_size=model.args.vocab_size,
        max_n=cfg.max_n,
        kv_capacity_tokens=engine.blocks.capacity_tokens,
        default_max_tokens=cfg.default_max_tokens,
    )

    def load_weights(path: str) -> dict[str, torch.Tensor]:
        # A fresh CPU copy of the served architecture; the engine copies it in between two steps.
        check_checkpoint_files(path)
        return load_model(path, dtype, "cpu", args=model.args).state_dict()

    root = cfg.resolved_weights_root()
    log.info("POST /update_weights loads from %s", root or "nowhere (pass --weights-root)")
    return build_app(engine, tokenizer, limits, load_weights, weights_root=root, api_key=cfg.resolved_api_key())


def main(cfg: ServeConfig) -> int:
    import uvicorn

    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build_server(cfg)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level)
    return 0
