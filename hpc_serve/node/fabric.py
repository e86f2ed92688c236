"""Whether the nodes of an allocation can talk: every node reaches every other on the address and
ports vLLM and Ray will use, and a short all-reduce completes (Gloo over the same network vLLM's
torch.distributed uses; NCCL too where the nodes have GPUs, saying which transport it chose).

The reach check is stdlib only: each node listens on the ports its plan binds, and connects to
every port of every other node. The all-reduce runs as a short script with the engine's own
Python (it needs torch), like Ray's probe; without torch there it is skipped, saying so.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping, Sequence

#: How long one connection attempt may take before the port counts as unreachable.
CONNECT_TIMEOUT_S = 3.0
#: The all-reduce: its size, how many timed rounds, and how long it may take in all (the first
#: import of torch from a cold network filesystem takes tens of seconds).
ALL_REDUCE_MIB, ALL_REDUCE_ROUNDS, ALL_REDUCE_TIMEOUT_S = 16, 3, 180

ALL_REDUCE = r"""
import json, os, sys, time
from datetime import timedelta
try:
    import torch
    import torch.distributed as dist
except ImportError as exc:
    print(json.dumps({"skipped": f"no torch in {sys.executable} ({exc})"}), flush=True)
    sys.exit(0)
address, port, rank, world, mib, rounds, timeout_s = sys.argv[1], int(sys.argv[2]), *map(int, sys.argv[3:])
result = {}


def timed(backend, device, group=None):
    tensor = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=device)
    dist.all_reduce(torch.ones(1024, device=device), group=group)  # connections made here
    times = []
    for _ in range(rounds):
        tensor.fill_(1.0)
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        dist.all_reduce(tensor, group=group)
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if float(tensor[0]) != world:
        raise RuntimeError(f"{backend} all-reduce gave {float(tensor[0])}, not {world}")
    took = sorted(times)[len(times) // 2]
    bus = 2 * (world - 1) / world * tensor.numel() * 4 / took
    return {"mib": mib, "seconds": round(took, 6), "bus_gbps": round(bus / 1e9, 3)}


dist.init_process_group("gloo", init_method=f"tcp://{address}:{port}", rank=rank, world_size=world,
                        timeout=timedelta(seconds=timeout_s))
result["gloo"] = timed("gloo", "cpu")
if torch.cuda.is_available() and torch.cuda.device_count() > 0:
    torch.cuda.set_device(0)
    result["nccl"] = timed("nccl", "cuda", dist.new_group(backend="nccl"))
dist.barrier()
dist.destroy_process_group()
print(json.dumps(result), flush=True)
"""


class Listeners:
    """Sockets listening on this node's planned ports while the others connect; each accepted
    connection is closed at once. ``refused``: the ports that could not be bound."""

    def __init__(self, ip: str, ports: Sequence[int]) -> None:
        self.sockets: list[socket.socket] = []
        self.refused: list[int] = []
        for port in ports:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((ip, port))
                sock.listen(64)
            except OSError:
                sock.close()
                self.refused.append(port)
                continue
            sock.settimeout(0.2)
            self.sockets.append(sock)
        self.closing = threading.Event()
        self.threads = [threading.Thread(target=self._accept, args=(s,), daemon=True) for s in self.sockets]
        for thread in self.threads:
            thread.start()

    @property
    def ports(self) -> list[int]:
        return [sock.getsockname()[1] for sock in self.sockets]

    def _accept(self, sock: socket.socket) -> None:
        while not self.closing.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:  # the timeout, or the socket closed
                continue
            conn.close()

    def close(self) -> None:
        self.closing.set()
        for thread in self.threads:
            thread.join(1.0)
        for sock in self.sockets:
            sock.close()


def reach(ip: str, port: int, timeout_s: float = CONNECT_TIMEOUT_S) -> str | None:
    """None when ``ip:port`` accepts a connection, else what went wrong, in words."""
    try:
        with socket.create_connection((ip, port), timeout=timeout_s):
            return None
    except socket.timeout:
        return f"no answer within {timeout_s:.0f} s (a firewall dropping packets?)"
    except OSError as exc:
        return exc.strerror or str(exc)


def unreached(peers: Mapping[int, Mapping[str, Any]], timeout_s: float = CONNECT_TIMEOUT_S) -> list[dict[str, Any]]:
    """Every (rank, port) of ``peers`` (``{rank: {"ip", "ports"}}``) this node cannot connect to."""
    targets = [(rank, peer["ip"], int(port)) for rank, peer in sorted(peers.items()) for port in peer["ports"]]
    if not targets:
        return []
    with ThreadPoolExecutor(max_workers=min(32, len(targets))) as pool:
        errors = list(pool.map(lambda target: reach(target[1], target[2], timeout_s), targets))
    return [{"to": rank, "ip": ip, "port": port, "error": error}
            for (rank, ip, port), error in zip(targets, errors) if error]


def all_reduce(python: str, head_ip: str, port: int, rank: int, world: int, env: Mapping[str, str],
               timeout_s: float = ALL_REDUCE_TIMEOUT_S, stop: threading.Event | None = None) -> dict[str, Any]:
    """Run the all-reduce on this node (every node runs it at once); its figures, ``skipped``
    (no torch there) or ``error`` (what failed, from the script's last lines). ``stop`` (a
    signal came) ends it at once."""
    argv = [python, "-c", ALL_REDUCE, head_ip, str(port), str(rank), str(world), str(ALL_REDUCE_MIB),
            str(ALL_REDUCE_ROUNDS), str(int(timeout_s))]
    nccl_env = {"NCCL_DEBUG": "INFO", "NCCL_DEBUG_SUBSYS": "INIT,NET"}
    began = time.monotonic()
    try:
        child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, **nccl_env, **env})
    except OSError as exc:
        return {"error": f"could not run {python}: {exc.strerror or exc}"}
    with child:
        try:
            stdout, stderr = _communicate(child, timeout_s + 30, stop)
        except subprocess.TimeoutExpired:
            child.kill()
            return {"error": f"the all-reduce did not finish within {timeout_s + 30:.0f} s"}
    done = subprocess.CompletedProcess(argv, child.returncode, stdout, stderr)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        last = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()][-3:]
        return {"error": f"the all-reduce failed (exit {done.returncode}): " + " | ".join(last)}
    result = {**json.loads(lines[-1]), "took_s": round(time.monotonic() - began, 3)}
    if "nccl" in result:
        result["nccl"]["transport"] = nccl_transport(done.stdout + done.stderr)
    return result


def _communicate(child: subprocess.Popen, timeout_s: float, stop: threading.Event | None) -> tuple[str, str]:
    """``child``'s output once it ends; killed when ``stop`` is set; TimeoutExpired after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return child.communicate(timeout=0.1)
        except subprocess.TimeoutExpired:
            if stop is not None and stop.is_set():
                child.kill()
            elif time.monotonic() > deadline:
                raise


_NCCL_NETWORK = re.compile(r"NCCL INFO Using network (\S+)")


def nccl_transport(log: str) -> str | None:
    """The network NCCL chose between nodes, from its INFO lines ("IB", "Socket", a plugin's name)."""
    found = _NCCL_NETWORK.findall(log)
    return found[-1] if found else None


def infiniband_devices(root: str = "/sys/class/infiniband") -> list[str]:
    """The InfiniBand (or RoCE) devices this node has."""
    try:
        return sorted(os.listdir(root))
    except OSError:
        return []
