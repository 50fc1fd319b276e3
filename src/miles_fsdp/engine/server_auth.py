"""API key check of the HTTP server: `Authorization: Bearer <key>`, what the OpenAI client sends.

Every path needs the key except `/health`, which load balancers and readiness probes poll
without credentials (it tells only whether the engine runs and its weight version).
"""

from __future__ import annotations

import hmac

from fastapi.responses import JSONResponse

from miles_fsdp.engine.protocol import error_body

OPEN_PATHS = frozenset({"/health"})


class ApiKeyMiddleware:
    """ASGI middleware answering 401 (OpenAI's body, code 'invalid_api_key') without the right key."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self._authorized(scope):
            return await self.app(scope, receive, send)
        given = any(k == b"authorization" for k, _ in scope["headers"])
        why = "the API key is wrong" if given else "no API key given"
        body = error_body(f"{why}: send the server's key as 'Authorization: Bearer <key>' "
                          "(the OpenAI client's api_key; MILES_API_KEY for miles-fsdp rollout)",
                          "invalid_request_error")
        body["error"]["code"] = "invalid_api_key"
        response = JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)

    def _authorized(self, scope) -> bool:
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        return hmac.compare_digest(given, self.expected)  # constant time: no key guessing by timing
