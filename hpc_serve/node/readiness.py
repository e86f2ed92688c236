"""Whether vLLM really serves: /health, the model listed, and the key asked for on every path.

Readiness is never read from logs (docs/engine.md): node 0 asks the server itself, and before the
endpoint is published it checks that paths vLLM's own key check leaves open refuse a caller
without the key. Stdlib only.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request


def _get(url: str, timeout: float = 1.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except (OSError, ValueError):
        return 0, b""


def serves(base_url: str, model: str, headers: dict[str, str] | None = None) -> bool:
    """Ready = /health answers 200 and /v1/models lists ``model``."""
    status, _ = _get(f"{base_url}/health")
    if status != 200:
        return False
    request = urllib.request.Request(f"{base_url}/v1/models", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=2.0) as response:
            listed = json.loads(response.read())
    except (OSError, ValueError):
        return False
    return any(entry.get("id") == model for entry in listed.get("data", []))


def unguarded(base_url: str, open_metrics: bool = False) -> str | None:
    """A path that serves without the key ("POST /invocations: 200"), or None when every one
    asked refuses (401). Checked before an endpoint is published."""
    probes = [("POST", "/invocations"), ("GET", "/version"), ("POST", "/tokenize")]
    probes += [] if open_metrics else [("GET", "/metrics")]
    for method, path in probes:
        request = urllib.request.Request(f"{base_url}{path}", data=b"{}" if method == "POST" else None,
                                         headers={"Content-Type": "application/json"}, method=method)
        try:
            with urllib.request.urlopen(request, timeout=5.0) as response:
                return f"{method} {path}: {response.status}"
        except urllib.error.HTTPError as exc:
            if exc.code != 401:
                return f"{method} {path}: {exc.code}"
        except (OSError, ValueError) as exc:
            return f"{method} {path}: {exc}"
    return None
