"""The CLI's view of a wait: one line per phase change, a spinner on a terminal, then how to connect."""

from __future__ import annotations

import contextlib
import shlex
import socket
import sys

from ..client.control import DeploymentStatus
from ..registry import Deployment
from ..client.waiting import Progress, wait_ready


def wait_with_view(target: Deployment | str, home: str | None, timeout_s: float | None) -> DeploymentStatus:
    """wait_ready, showing progress on stderr (a live spinner when stderr is a terminal)."""
    live = None
    if sys.stderr.isatty():
        from rich.console import Console

        console = Console(stderr=True, highlight=False)
        live = console.status("waiting for the deployment")

    def show(progress: Progress) -> None:
        clock = f"[{progress.waited_s:6.1f} s]"
        text = f"{clock} {progress.line()}"
        if live is not None:
            live.console.print(text, markup=False)
            live.update(f"{progress.line()}  (Ctrl-C stops waiting; the deployment keeps running)")
        else:
            print(text, file=sys.stderr, flush=True)

    with live if live is not None else contextlib.nullcontext():
        return wait_ready(target, home=home, timeout_s=timeout_s, on_update=show)


def print_connect(dep: Deployment, login_host: str | None) -> None:
    """The endpoint, and an ssh tunnel command for a laptop outside the cluster."""
    endpoint = dep.read("endpoint.json", {}) or {}
    if not endpoint:
        return
    via = login_host or socket.gethostname()
    print(f"READY: {endpoint['url']}  (model {endpoint['served_model']}, on {endpoint['hostname']})")
    print(f"from your laptop: ssh -N -L 127.0.0.1:8000:{endpoint['host']}:{endpoint['port']} {via}")
    print("then:             export OPENAI_BASE_URL=http://127.0.0.1:8000/v1")
    if endpoint.get("api_key_file"):
        print(f'                  export OPENAI_API_KEY="$(cat {shlex.quote(endpoint["api_key_file"])})"')
    else:
        print("                  (no API key: started with --no-api-key)")
    print(f"or, with hpc-serve on your laptop (a free port, reconnects, follows restarts): "
          f"hpc-serve tunnel {dep.id} --via {via}")
