"""ServerThread: serve an app with uvicorn on a background thread, for tests that talk HTTP
to a real server (tests/engine, tests/rl)."""

from __future__ import annotations

import threading
import time

import uvicorn
from fastapi import FastAPI


class ServerThread:
    """Serve an app with uvicorn on a background thread: `with ServerThread(app) as url: ...`.

    port=0 takes a free ephemeral port; `url` is e.g. "http://127.0.0.1:41234".
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 30.0):
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.host, self.start_timeout_s = host, start_timeout_s
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start within {self.start_timeout_s}s (see its log above)")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://{self.host}:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
