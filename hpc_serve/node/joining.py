"""How a node joins its deployment: its address, its record, and the nodes waiting for each other.

Each node records who it is (hostname, address, Slurm node id, GPUs) in ``nodes/<rank>.json``;
a follower first waits for node 0's record (its default address is the one its route to node 0
leaves from), node 0 waits until every node has reported. Every wait polls the registry with a
timeout and names what did not happen. Stdlib only.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from ..errors import HpcServeError
from .context import NodeRun
from .netaddr import choose_address
from .polling import wait_until


def node_identity(rank: int, ip: str) -> dict[str, Any]:
    """What this node is, as Slurm and the network see it (``ip``: the address it serves on)."""
    env = os.environ
    return {
        "rank": rank, "hostname": socket.gethostname(), "ip": ip, "pid": os.getpid(),
        "started": time.time(), "slurm_node_id": env.get("SLURM_NODEID"),
        "slurmd_nodename": env.get("SLURMD_NODENAME"),
        "cuda_visible_devices": env.get("CUDA_VISIBLE_DEVICES"),
        "slurm_gpus_on_node": env.get("SLURM_GPUS_ON_NODE"),
    }


def head_record(run: NodeRun) -> dict | None:
    """Node 0's record of this run: this node's own on node 0, else waited for (None: it never came)."""
    if run.is_head:
        return run.identity
    wait_until(lambda: 0 in run.records(), run.join_timeout_s, stop=run.stop)
    return run.records().get(0)


def node_address(run: NodeRun) -> tuple[str, str]:
    """(this node's address, how it was chosen). A follower first waits for node 0's record: its
    default is the address its route to node 0 leaves from. With a named network, Gloo and NCCL
    are pointed at the same interface unless the user chose one. Raises HpcServeError."""
    spec, head_ip = run.spec, None
    if not run.is_head and spec.network is None:
        head_ip = (head_record(run) or {}).get("ip")
    chosen = choose_address(spec.network, head_ip)
    if run.multi_host and chosen.ip.startswith("127."):
        raise HpcServeError(f"{socket.gethostname()} has only a loopback address ({chosen.ip}), which "
                            "the other nodes cannot reach.",
                            "Name the network the nodes share: --network IFACE (e.g. ib0) or a CIDR.")
    if spec.network and chosen.interface:
        user_env = dict(spec.env)
        for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            if name not in os.environ and name not in user_env:
                os.environ[name] = chosen.interface
    return chosen.ip, chosen.how


def wait_for_nodes(run: NodeRun) -> list[int]:
    """Node 0: poll until every node of this run has reported, saying so as they come; return
    the missing ranks (empty on success, or when a signal ends the wait)."""
    count, reported = run.spec.layout.nodes, 0
    deadline = time.monotonic() + run.join_timeout_s
    while not run.stop.is_set():
        ranks = set(run.records())
        if len(ranks) != reported:
            reported = len(ranks)
            run.dep.set_phase("STARTING", f"{reported}/{count} nodes reported")
            run.log(f"{reported}/{count} nodes reported")
        if reported >= count:
            return []
        if time.monotonic() > deadline:
            return sorted(set(range(count)) - ranks)
        run.stop.wait(0.2)
    return []


def gres_mismatch(run: NodeRun) -> str | None:
    """Slurm's GPU count on this node, when it has one, must be what the layout plans."""
    identity, per_node = run.identity, run.spec.layout.gpus_per_node
    given = identity.get("slurm_gpus_on_node") or ""
    if given.isdigit() and int(given) != per_node:
        return (f"Slurm gave {identity['hostname']} {given} GPU(s) (CUDA_VISIBLE_DEVICES="
                f"{identity.get('cuda_visible_devices')}) but the layout needs "
                f"{per_node} per node: resubmit with --gpus-per-node {given}")
    return None
