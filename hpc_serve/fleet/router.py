"""vllm-router: its command line, and its admin API as the keeper uses it. Stdlib only.

Read from vllm-router 0.1.17 (``vllm-router --help`` and its routes): it starts with no worker,
``POST /add_worker?url=`` returns once the worker's ``/health`` answers (so it is called off the
keeper's loop, with a time limit), ``POST /remove_worker?url=`` takes effect at once (a request
already sent to that worker runs to its end), ``GET /list_workers`` lists them, and its Prometheus
exporter counts requests per worker (``vllm_router_processed_requests_total{worker=...}``).
"""

from __future__ import annotations

import json
import re
import shlex
import urllib.error
import urllib.parse
import urllib.request

#: How long vllm-router waits for a new worker's /health before it gives up on it.
WORKER_STARTUP_S = 30
_PROCESSED = re.compile(r'^vllm_router_processed_requests_total\{worker="([^"]+)"\}\s+([0-9.e+]+)\s*$', re.M)


def router_argv(command: str, port: int, metrics_port: int, policy: str) -> list[str]:
    """vllm-router on 127.0.0.1 only (the front is the public face), no worker yet. Its health
    checks are left at theirs: membership comes from the registry, not from them."""
    return [*shlex.split(command), "--host", "127.0.0.1", "--port", str(port), "--policy", policy,
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port),
            "--worker-startup-timeout-secs", str(WORKER_STARTUP_S), "--log-level", "warning"]


class RouterAdmin:
    """The admin routes of the router at 127.0.0.1:``port``."""

    def __init__(self, port: int, metrics_port: int) -> None:
        self.base, self.metrics_base = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}"

    def _call(self, method: str, path: str, timeout_s: float) -> tuple[int, str]:
        request = urllib.request.Request(self.base + path, method=method, data=b"" if method == "POST" else None)
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return response.status, response.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def add(self, url: str, timeout_s: float = WORKER_STARTUP_S + 5) -> tuple[bool, str]:
        """Put worker ``url`` in; (done, what the router said)."""
        code, text = self._call("POST", "/add_worker?url=" + urllib.parse.quote(url, safe=""), timeout_s)
        return code == 200, text.strip()

    def remove(self, url: str, timeout_s: float = 5.0) -> tuple[bool, str]:
        """Take worker ``url`` out (immediate); (done, what the router said)."""
        code, text = self._call("POST", "/remove_worker?url=" + urllib.parse.quote(url, safe=""), timeout_s)
        return code == 200, text.strip()

    def workers(self, timeout_s: float = 5.0) -> list[str]:
        """The workers the router routes to now."""
        code, text = self._call("GET", "/list_workers", timeout_s)
        if code != 200:
            raise OSError(f"GET /list_workers answered {code}: {text[:200]}")
        return list(json.loads(text).get("urls", []))

    def ready(self, timeout_s: float = 1.0) -> bool:
        """Whether the router answers at all (its /health is 200 with every worker healthy or none)."""
        try:
            self._call("GET", "/health", timeout_s)
            return True
        except OSError:
            return False

    def requests_per_worker(self, timeout_s: float = 2.0) -> dict[str, int]:
        """Requests the router has sent to each worker, from its Prometheus exporter."""
        with urllib.request.urlopen(self.metrics_base + "/metrics", timeout=timeout_s) as response:
            text = response.read().decode(errors="replace")
        return {url: int(float(count)) for url, count in _PROCESSED.findall(text)}
