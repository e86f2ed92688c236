"""Forming a deployment's Ray cluster: its token, the head's address, and proof that it formed.

Stdlib only (runs inside the allocation). Ray itself is only imported by the probe, a short
script run with the Python that Ray's own ``ray`` command uses.
"""

from __future__ import annotations

import json
import os
import queue
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

#: Reports the live Ray nodes as JSON lines ({"ip": gpus, ...}) whenever they change, until killed.
PROBE = r"""
import json, sys, time
address = sys.argv[1]
def alive_nodes():
    try:
        from ray._raylet import GcsClient
        client = GcsClient(address=address)
        def read():
            infos = client.get_all_node_info(timeout=5).values()
            return {i.node_manager_address: float(dict(i.resources_total).get("GPU", 0))
                    for i in infos if i.state == 0}
        read()
        return read
    except (ImportError, AttributeError, TypeError):
        import ray
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        return lambda: {n["NodeManagerAddress"]: float(n["Resources"].get("GPU", 0))
                        for n in ray.nodes() if n["Alive"]}
read, last = alive_nodes(), None
while True:
    nodes = read()
    if nodes != last:
        print(json.dumps(nodes), flush=True)
        last = nodes
    time.sleep(0.2)
"""


def ray_env(token_path: str, gcs_wait_s: float) -> tuple[tuple[str, str], ...]:
    """Environment for every Ray process and driver of a deployment: token auth (the token by
    path, never by value), and how long a worker started alongside the head waits for it."""
    return (("RAY_AUTH_MODE", "token"), ("RAY_AUTH_TOKEN_PATH", token_path),
            ("RAY_USAGE_STATS_ENABLED", "0"), ("RAY_gcs_server_port_wait_time_s", str(int(gcs_wait_s))))


def ray_python(ray_cmd: str) -> str:
    """The interpreter behind the ``ray`` command (its script's #! line), else this one."""
    words = shlex.split(ray_cmd)
    path = shutil.which(words[0]) if words else None
    if len(words) > 1 and "python" in os.path.basename(words[0]):
        return words[0]  # "python -m ray..." style commands
    try:
        with open(path or "", "rb") as handle:
            first = handle.readline().decode(errors="replace").strip()
    except OSError:
        return sys.executable
    if first.startswith("#!") and "python" in first:
        shebang = shlex.split(first[2:])
        return shebang[-1] if os.path.basename(shebang[0]) == "env" else shebang[0]
    return sys.executable


@dataclass
class Formation:
    """The probe's last view of the cluster; ``strangers``: addresses Ray reports that no agent did."""

    nodes: dict[str, float]
    complete: bool
    strangers: tuple[str, ...] = ()

    def describe(self, want_nodes: int, want_gpus: int) -> str:
        gpus = int(sum(self.nodes.values()))
        return f"Ray: {len(self.nodes)}/{want_nodes} nodes, {gpus}/{want_gpus} GPUs joined"


class ClusterProbe:
    """Watches the Ray cluster at ``address`` through the probe script, in the background."""

    def __init__(self, python: str, address: str, env: dict[str, str], log_path: str) -> None:
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            self.popen = subprocess.Popen([python, "-c", PROBE, address], env=env, text=True,
                                          stdout=subprocess.PIPE, stderr=log,
                                          stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            os.close(log)
        self.views: queue.Queue[dict[str, float]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            try:
                self.views.put(json.loads(line))
            except ValueError:
                continue

    def next_view(self, timeout: float) -> dict[str, float] | None:
        """The next change in live nodes, or None when none came within ``timeout``."""
        try:
            return self.views.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()


def wait_formed(probe: ClusterProbe, want: dict[str, int], timeout_s: float, on_change,
                alive, stop: threading.Event) -> Formation:
    """Wait until every IP of ``want`` ({ip: gpus}) is alive with its GPUs, or give up: at once
    when Ray reports a node under an address no agent reported (the two disagree on the node's
    address, and waiting would not change that).

    ``alive()`` says whether our own Ray processes still run; ``on_change(formation)`` reports.
    """
    deadline = time.monotonic() + timeout_s
    seen: dict[str, float] = {}
    while not stop.is_set() and time.monotonic() < deadline and alive():
        view = probe.next_view(0.1)
        if view is None:
            if probe.popen.poll() is not None and probe.views.empty():
                break  # the probe died (its error is in the log)
            continue
        seen = view
        strangers = tuple(sorted(set(seen) - set(want)))
        if strangers:
            return Formation(seen, False, strangers)
        complete = all(seen.get(ip, 0) >= gpus for ip, gpus in want.items())
        on_change(Formation(seen, complete))
        if complete:
            return Formation(seen, True)
    return Formation(seen, False)
