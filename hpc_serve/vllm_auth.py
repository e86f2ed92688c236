"""The deployment's key on every path of vLLM's server, not only on /v1.

vLLM's own `--api-key` guards only paths under /v1, /v2, /inference and /cohere: `/invocations`
serves completions without a key, and `/version`, `/load`, `/metrics`, `/tokenize`, ... are open.
This ASGI middleware, loaded by vLLM itself (`--middleware hpc_serve_auth.KeyRequired`), answers
401 to every HTTP request and closes every WebSocket that lacks ``Authorization: Bearer <key>``
(compared in constant time), except the open paths (`/health`; `HPC_SERVE_OPEN_PATHS` adds e.g.
`/metrics`). The key comes from HPC_SERVE_API_KEY in vLLM's environment, not VLLM_API_KEY: vLLM
0.24 hashes every VLLM_* variable it knows into its compile cache key and writes them into
cache_key_factors.json, so a per-deployment key there made every start compile from scratch
and left the key in the cache folder.

It runs inside vLLM's API server, in front of every route, so nothing is proxied: streams, client
disconnects and keep-alive are vLLM's own. Standalone (stdlib only, no hpc_serve import): the node
agent copies this file as ``hpc_serve_auth.py`` into the job's temp folder and puts that folder on
vLLM's PYTHONPATH, so vLLM's Python needs no hpc-serve installed.
"""

from __future__ import annotations

import hmac
import json
import os
from typing import Any, Awaitable, Callable

MODULE = "hpc_serve_auth"
MIDDLEWARE = f"{MODULE}.KeyRequired"
OPEN_PATHS_ENV = "HPC_SERVE_OPEN_PATHS"
KEY_ENV = "HPC_SERVE_API_KEY"

_BODY = json.dumps({"error": {"message": "This endpoint needs its API key: send 'Authorization: Bearer "
                                         "<key>' (hpc-serve endpoint ID --export prints the exports).",
                              "type": "invalid_request_error", "code": 401}}).encode()


class KeyRequired:
    """ASGI middleware: no request without the key reaches vLLM, except the open paths."""

    def __init__(self, app: Callable[..., Awaitable[Any]]) -> None:
        self.app = app
        key = os.environ.get(KEY_ENV, "")
        self.expected = f"Bearer {key}".encode() if key else b""
        self.open = {"/health", *(p for p in os.environ.get(OPEN_PATHS_ENV, "").split(",") if p)}

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        kind = scope.get("type")
        if kind not in ("http", "websocket"):  # lifespan
            return await self.app(scope, receive, send)
        if kind == "http" and scope.get("path") in self.open:
            return await self.app(scope, receive, send)
        given = b""
        for name, value in scope.get("headers", ()):
            if name.lower() == b"authorization":
                given = value
        if self.expected and hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        if kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"),
                                (b"content-length", str(len(_BODY)).encode())]})
        await send({"type": "http.response.body", "body": _BODY})


def install(folder: str) -> str:
    """Copy this module into ``folder`` as ``hpc_serve_auth.py`` (0600); return ``folder``."""
    os.makedirs(folder, mode=0o700, exist_ok=True)
    target = os.path.join(folder, f"{MODULE}.py")
    with open(__file__, encoding="utf-8") as source:
        text = source.read()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    return folder
