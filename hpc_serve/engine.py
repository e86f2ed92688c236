"""Running the engine on a node: runtime values, port checks, process groups, readiness probes.

Stdlib only (runs inside the allocation). Every process is started in its own session so that
the agent can end it and all its children on every path, whatever Slurm's process tracking is.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections import deque

from .launch import Process
from .ports import job_ports
from .vllm_args import Runtime

#: /dev/shm files vLLM and torch leave behind when killed (see docs/engine.md).
SHM_PATTERNS = ("psm_*", "sem.mp-*", "vllm*")
#: The environment variable that marks every process a node agent starts.
MARKER = "HPC_SERVE_PROCESS"


def job_number(job_id: str) -> int:
    digits = "".join(ch for ch in job_id if ch.isdigit())
    return int(digits) if digits else 0


def make_runtime(job_id: str, node_ip: str, head_ip: str, api_port: int | None) -> Runtime:
    """Real addresses, ports (derived from the job id) and a short per-job temp dir."""
    ports = job_ports(job_number(job_id), api_port)
    return Runtime(node_ip=node_ip, head_ip=head_ip, api_port=str(ports.api), ray_port=str(ports.ray),
                   master_port=str(ports.master), dp_rpc_port=str(ports.dp_rpc),
                   ray_client_port=str(ports.ray_client), tmp_dir=f"/tmp/hs-{job_id}")


def busy_ports(ip: str, ports: list[int]) -> list[int]:
    """The ports of ``ports`` that cannot be bound on ``ip`` right now."""
    busy = []
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((ip, port))
            except OSError:
                busy.append(port)
    return busy


class EngineProcess:
    """One planned process, in its own session, its output appended to ``log_path``.

    ``marker`` (deployment and rank) is put in its environment, which every descendant inherits:
    :meth:`stop` ends what left the process group too (Ray's workers start their own).
    """

    def __init__(self, process: Process, log_path: str, tmp_dir: str, marker: str) -> None:
        self.process, self.log_path, self.tmp_dir, self.marker = process, log_path, tmp_dir, marker
        self.popen: subprocess.Popen | None = None

    def start(self) -> None:
        for sub in ("vllm-cache", "inductor", "tmp"):
            os.makedirs(os.path.join(self.tmp_dir, sub), mode=0o700, exist_ok=True)
        env = {**os.environ, **dict(self.process.env),
               "VLLM_CACHE_ROOT": os.path.join(self.tmp_dir, "vllm-cache"),
               "TORCHINDUCTOR_CACHE_DIR": os.path.join(self.tmp_dir, "inductor"),
               "TMPDIR": os.path.join(self.tmp_dir, "tmp"), MARKER: self.marker,
               "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1"}
        log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            self.popen = subprocess.Popen(list(self.process.argv), env=env, stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True)
        except OSError as exc:
            raise RuntimeError(f"cannot start {self.process.argv[0]}: {exc.strerror}") from None
        finally:
            os.close(log)

    @property
    def exit_code(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def stop(self, grace_s: float = 3.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after ``grace_s`` (marked strays too)."""
        if self.popen is not None and self.popen.poll() is None:
            _signal_group(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        if self.popen is not None:
            _signal_group(self.popen.pid, signal.SIGKILL)  # children that outlived their leader
            try:
                self.popen.wait(2)
            except subprocess.TimeoutExpired:
                pass
        for pid in marked_pids(self.marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def marked_pids(marker: str) -> list[int]:
    """Our own processes whose environment carries ``marker``."""
    needle = f"\0{MARKER}={marker}\0".encode()
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid != os.getuid():
                continue
            with open(f"/proc/{name}/environ", "rb") as handle:
                if needle in b"\0" + handle.read() + b"\0":
                    pids.append(int(name))
        except OSError:
            continue
    return pids


def shm_files() -> set[str]:
    """/dev/shm files of the kinds vLLM and torch leave behind."""
    return {path for pattern in SHM_PATTERNS for path in glob.glob(os.path.join("/dev/shm", pattern))}


def clean_node(tmp_dir: str, shm_before: set[str]) -> None:
    """Remove the deployment's temp dir and the /dev/shm files our processes left."""
    for path in shm_files() - shm_before:
        try:
            if os.stat(path).st_uid == os.getuid():
                os.unlink(path)
        except OSError:
            pass
    shutil.rmtree(tmp_dir, ignore_errors=True)


def sweep_stale_tmp(live_jobs: set[str], root: str = "/tmp") -> list[str]:
    """Remove ``hs-<job>`` temp dirs of ours whose Slurm job is not live on this node any more (an
    agent killed with SIGKILL cannot clean up after itself); return what was removed."""
    removed = []
    for name in sorted(os.listdir(root)):
        job = name[3:]
        path = os.path.join(root, name)
        if not name.startswith("hs-") or not job.isdigit() or job in live_jobs:
            continue
        try:
            if os.lstat(path).st_uid != os.getuid() or not os.path.isdir(path):
                continue
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def tail(path: str, lines: int = 12) -> str:
    """The last ``lines`` lines of a log, joined, for failure reasons."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return "\n".join(line.rstrip() for line in deque(handle, maxlen=lines))
    except OSError:
        return "(no log)"


_LOG_PREFIX = re.compile(r"^\([^)]*\)\s+[A-Z]+\s+\S+\s+\S+\s+\[[^\]]*\]\s?")
_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit): \S.*$")


def root_error(path: str, lines: int = 400) -> str | None:
    """The first exception line ("ValueError: ...") among a log's last lines: the root cause."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            recent = deque(handle, maxlen=lines)
    except OSError:
        return None
    for line in recent:
        text = _LOG_PREFIX.sub("", line.strip())
        if _EXCEPTION.match(text):
            return text
    return None


def exit_reason(what: str, where: str, code: int, log_path: str) -> str:
    """One line naming the process, its exit code and root error; then its last lines."""
    error = root_error(log_path)
    head = f"{what} on {where} exited with code {code}" + (f": {error}" if error else "")
    return f"{head}\nlast lines of its log:\n{tail(log_path, 8)}"


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


def wait_until(condition, timeout_s: float, poll_s: float = 0.1, stop=None) -> bool:
    """Poll ``condition`` until true, ``stop`` is set, or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        if stop is not None and stop.wait(poll_s):
            return False
        if stop is None:
            time.sleep(poll_s)
    return False
