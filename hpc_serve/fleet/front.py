"""The group's public address: the key on every request, and no way to the router's admin routes.

vllm-router checks no client key (it passes the Authorization header on to the replicas), and its
admin routes (``/add_worker``, ``/remove_worker``, ``/workers``, ...) have no auth at all: whoever
reached them could add a worker of their own and receive the clients' requests and keys. So the
router listens on 127.0.0.1 only and this front is what the group publishes. For each connection
it reads one request head and answers 401 without the group's key (compared in constant time),
404 for a path that is not an inference route (the admin routes among them); otherwise it hands
the connection to the router with ``Connection: close`` (one request per connection, so that every
request is checked) and relays the bytes both ways untouched: streams are the router's own.
Stdlib only.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
from typing import Callable

#: Paths that answer without the key (they carry no data).
OPEN_PATHS = frozenset({"/health", "/readiness", "/liveness"})
#: Inference paths outside /v1 that vLLM and the router serve.
EXTRA_PATHS = frozenset({"/health_generate", "/tokenize", "/detokenize", "/pooling", "/classify", "/score",
                         "/rerank", "/v2/rerank"})
_V1 = re.compile(r"^/v1/[A-Za-z0-9_.\-/]*$")
_HEAD_LIMIT = 64 * 1024
_DROPPED = (b"connection", b"keep-alive", b"proxy-connection")


def allowed_path(path: str) -> bool:
    """Whether ``path`` (no query) is an inference route the front lets through."""
    if path in OPEN_PATHS or path in EXTRA_PATHS:
        return True
    return bool(_V1.match(path)) and "//" not in path and "/../" not in path + "/" and "/./" not in path + "/"


def _answer(status: int, reason: str, message: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "code": status}}).encode()
    extra = b"www-authenticate: Bearer\r\n" if status == 401 else b""
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n").encode() + extra + b"\r\n" + body


UNAUTHORIZED = _answer(401, "Unauthorized", "This endpoint needs its API key: send 'Authorization: Bearer <key>' "
                                            "(hpc-serve endpoint NAME --export prints the exports).")
NOT_ROUTED = _answer(404, "Not Found", "Not an inference route of this group's endpoint (the router's admin "
                                       "routes are not reachable through it).")
BAD_REQUEST = _answer(400, "Bad Request", "Malformed HTTP request.")


def judge(head: bytes, key: str) -> tuple[bytes | None, bytes]:
    """(the refusal to send, or None) and the head to forward: ``Connection: close`` instead of
    any connection header the client sent."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[1].startswith(b"/"):
        return BAD_REQUEST, b""
    path = parts[1].split(b"?", 1)[0].decode("latin-1")
    given, kept = b"", [lines[0]]
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            return BAD_REQUEST, b""
        lowered = name.strip().lower()
        if lowered == b"authorization":
            given = value.strip()
        if lowered not in _DROPPED:
            kept.append(line)
    if not allowed_path(path):
        return NOT_ROUTED, b""
    if key and path not in OPEN_PATHS and not hmac.compare_digest(given, f"Bearer {key}".encode()):
        return UNAUTHORIZED, b""
    return None, b"\r\n".join(kept + [b"Connection: close", b"", b""])


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                break
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        try:
            writer.close()
        except (ConnectionError, OSError):
            pass


class KeyFront:
    """An asyncio server on (host, port) in front of the router at 127.0.0.1:``router_port``."""

    def __init__(self, key: str, router_port: int, on_refusal: Callable[[str], None] = lambda line: None) -> None:
        self.key, self.router_port, self.on_refusal = key, router_port, on_refusal
        self.refused = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, OSError):
            writer.close()
            return
        refusal, forwarded = judge(head[:-4], self.key)
        if refusal is not None:
            self.refused += 1
            self.on_refusal(head.split(b"\r\n", 1)[0].decode("latin-1")[:200])
            try:
                writer.write(refusal)
                await writer.drain()
            except (ConnectionError, OSError):
                pass
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.router_port)
        except OSError:
            writer.write(_answer(503, "Service Unavailable", "The group's router is not running."))
            writer.close()
            return
        up_writer.write(forwarded)
        upstream = asyncio.ensure_future(_pump(reader, up_writer))
        await _pump(up_reader, writer)  # the router closes after its answer (Connection: close)
        upstream.cancel()
        up_writer.close()

    async def serve(self, host: str, port: int, started: Callable[[int], None], stop: asyncio.Event) -> None:
        """Listen until ``stop`` is set; ``started`` gets the port (``port`` 0: one the kernel picks)."""
        server = await asyncio.start_server(self.handle, host, port, limit=_HEAD_LIMIT, backlog=1024)
        started(server.sockets[0].getsockname()[1])
        async with server:
            await stop.wait()
