"""Forming a deployment's Ray cluster: its token, the head's address, and proof that it formed.

Node 0 writes the token, starts the head, waits for its port, publishes its address and waits
until Ray reports every node and GPU (naming the ones that did not join); a worker starts as
soon as the token exists. Stdlib only (runs inside the allocation). Ray itself is only imported
by the probe, a short script run with the Python that Ray's own ``ray`` command uses.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from ..planner.ports import port_open
from ..registry import RAY, RAY_TOKEN, TERMINAL
from .environment import command_python
from .logs import exit_reason
from .polling import wait_until

if TYPE_CHECKING:
    from .context import NodeRun
    from .engine import EngineProcess

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


def wait_formed(probe: ClusterProbe, want: dict[str, int], timeout_s: float,
                on_change: Callable[[Formation], None], alive: Callable[[], bool],
                stop: threading.Event) -> Formation:
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


def deployment_ray_env(run: "NodeRun") -> tuple[tuple[str, str], ...]:
    """:func:`ray_env` of this deployment: its token file, and the run's join timeout."""
    return ray_env(run.dep.file(RAY_TOKEN), run.join_timeout_s)


def wait_for_ray_token(run: "NodeRun") -> bool:
    """A worker waits for the deployment's Ray token, which node 0 writes just before it starts
    the head (False: it never did). The worker then starts at once, alongside the head: its
    `ray start` waits for the head's GCS itself (up to RAY_gcs_server_port_wait_time_s)."""
    dep = run.dep
    return wait_until(lambda: dep.read_secret(RAY_TOKEN) != "" or dep.phase in TERMINAL,
                      run.join_timeout_s, stop=run.stop) and dep.read_secret(RAY_TOKEN) != ""


def form_ray(run: "NodeRun", head: "EngineProcess") -> str | None:
    """Node 0, its Ray head started: wait for the head's port, publish it, and wait until every
    node and GPU joined. Returns why it did not form (None: formed, or a signal ended the wait)."""
    dep, lay, timeout_s, rt = run.dep, run.spec.layout, run.join_timeout_s, run.runtime
    assert rt is not None
    address = f"{rt.node_ip}:{rt.ray_port}"
    up = wait_until(lambda: head.exit_code is not None or port_open(rt.node_ip, int(rt.ray_port)),
                    timeout_s, stop=run.stop)
    if run.stop.is_set():
        return None
    if head.exit_code is not None:
        return exit_reason("the Ray head", "node 0", head.exit_code, dep.log_path(0))
    if not up:
        return f"the Ray head did not open {address} within {timeout_s:.0f} s"
    dep.write(RAY, {"address": address})
    run.mark("ray_head_up")
    want_gpus = lay.nodes * lay.gpus_per_node
    dep.set_phase("STARTING", f"Ray head up at {address}; 1/{lay.nodes} nodes")
    nodes = run.records()
    want = {record["ip"]: lay.gpus_per_node for record in nodes.values()}

    def on_change(formation: Formation) -> None:
        text = formation.describe(lay.nodes, want_gpus)
        dep.set_phase("STARTING", text)
        run.log(text)

    env = {**os.environ, **dict(deployment_ray_env(run))}
    probe = ClusterProbe(command_python(run.spec.ray_cmd), address, env, dep.log_path(0))
    try:
        formation = wait_formed(probe, want, timeout_s, on_change, lambda: head.exit_code is None, run.stop)
    finally:
        probe.close()
    if formation.complete:
        run.mark("ray_formed")
        return None
    if run.stop.is_set():
        return None
    if probe.popen.returncode not in (None, -9):
        return exit_reason("the Ray probe (ray's Python, from --ray-cmd)", "node 0",
                           probe.popen.returncode, dep.log_path(0))
    if head.exit_code is not None:
        return exit_reason("the Ray head", "node 0", head.exit_code, dep.log_path(0))
    missing = [f"{record['hostname']} ({record['ip']})" for record in nodes.values()
               if formation.nodes.get(record["ip"], 0) < lay.gpus_per_node]
    if formation.strangers:
        return (f"Ray registered node(s) at {', '.join(formation.strangers)}, but the agents reported "
                f"{', '.join(missing) or 'other addresses'}: the two disagree on the node's address. "
                "Name the network with --network (an interface such as ib0, or a CIDR).")
    return (f"Ray did not form within {timeout_s:.0f} s: "
            f"{formation.describe(lay.nodes, want_gpus)}; missing: {', '.join(missing)}")
