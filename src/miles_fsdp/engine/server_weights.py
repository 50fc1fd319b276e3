"""POST /update_weights {"path": DIR, "version": N}: swap in the HF checkpoint at DIR.

DIR must lie under the weights root the operator named (`serve --weights-root`), checked
after resolving symlinks and '..'; nothing outside it is opened, not even to say whether it
exists. Error messages name the path asked for, never what a directory holds.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import Request as HTTPRequest
from safetensors import SafetensorError

from miles_fsdp.engine.protocol import ApiError, UpdateWeightsRequest, parse
from miles_fsdp.models.hf_io import INDEX_FILE, SINGLE_FILE, checkpoint_files

if TYPE_CHECKING:
    from miles_fsdp.engine.server import ServerState


async def update_weights(http: HTTPRequest):
    s: ServerState = http.app.state.server
    body = parse(UpdateWeightsRequest, await http.body())
    path = checkpoint_dir(body.path, s.weights_root)
    try:
        weights = await asyncio.to_thread(s.load_weights, str(path))
    except (ValueError, OSError, SafetensorError) as e:  # CheckpointError is a ValueError
        raise ApiError(f"path: cannot load weights from {body.path}: {e}", "path") from None
    try:
        await s.engine_loop.call(lambda: s.engine.update_weights(weights, body.version))
    except ValueError as e:  # names or shapes that do not fit the served model
        raise ApiError(f"path: {body.path} does not fit the served model: {e}", "path") from None
    s.weight_version = body.version
    s.metrics.weight_version.set(body.version)
    return {"ok": True, "weight_version": body.version}


def checkpoint_dir(raw: str, root: Path | None) -> Path:
    """`raw` resolved, if it is a directory under `root` (None: no path is allowed)."""
    if root is None:
        raise ApiError("path: this server loads no weights over HTTP (started without --weights-root); restart "
                       "it with --weights-root DIR, DIR holding the checkpoints to load", "path", 403)
    try:
        path, root = Path(raw).resolve(), root.resolve()
    except (OSError, RuntimeError, ValueError) as e:  # a symlink loop, a NUL byte
        raise ApiError(f"path: cannot resolve {raw!r} ({type(e).__name__}); give a plain directory path", "path") from None
    if not path.is_relative_to(root):
        raise ApiError(f"path: {raw!r} is outside this server's weights root {str(root)!r}; write the checkpoint "
                       "under it, or restart the server with a --weights-root that holds the path", "path", 403)
    if not path.is_dir():
        raise ApiError(f"path: {raw!r} is not a directory; give an HF checkpoint directory holding *.safetensors",
                       "path")
    return path


def check_checkpoint_files(path: str | Path) -> None:
    """Raise ValueError unless `path` holds a safetensors checkpoint, without listing the
    directory (the loader's message would) and refusing index shards outside it. A file cut
    short is named by the loader itself (models.hf_io.open_safetensors)."""
    path = Path(path).resolve()
    if (path / INDEX_FILE).is_file():
        for name in checkpoint_files(path):  # CheckpointError (a ValueError) names the index and the shard
            if not (path / name).resolve().is_relative_to(path):
                raise ValueError(f"{path / INDEX_FILE} names the shard {name!r}, outside {path}; keep shards beside it")
    elif not (path / SINGLE_FILE).is_file():
        raise ValueError(f"no {SINGLE_FILE} or {INDEX_FILE} there; write the HF checkpoint (save_hf) into {path}")
