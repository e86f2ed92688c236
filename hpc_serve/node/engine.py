"""Running the engine on a node: runtime values, port checks, process groups, readiness probes.

Stdlib only (runs inside the allocation). Every process is started in its own session so that
the agent can end it and all its children on every path, whatever Slurm's process tracking is,
and with a parent-death signal, so that it ends with its agent even when the agent is killed.
"""

from __future__ import annotations

import ctypes
import glob
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
import urllib.error
import urllib.request
from collections import deque

from ..planner.launch import Process
from ..planner.ports import job_ports
from ..planner.vllm_args import Runtime

#: /dev/shm files vLLM and torch leave behind when killed (see docs/engine.md).
SHM_PATTERNS = ("psm_*", "sem.mp-*", "vllm*")
#: The environment variable that marks every process a node agent starts.
MARKER = "HPC_SERVE_PROCESS"
#: The signal an engine's process leader gets when its agent dies (vLLM and Ray then stop their
#: own children, as on a cancel).
PARENT_DEATH_SIGNAL = signal.SIGTERM
_PR_SET_PDEATHSIG = 1


def job_number(job_id: str) -> int:
    digits = "".join(ch for ch in job_id if ch.isdigit())
    return int(digits) if digits else 0


def make_runtime(job_id: str, node_ip: str, head_ip: str, api_port: int | None) -> Runtime:
    """Real addresses, every port (derived from the job id) and a short per-job temp dir."""
    return Runtime.for_job(job_ports(job_number(job_id), api_port), node_ip, head_ip, f"/tmp/hs-{job_id}")


def private_dir(path: str) -> str:
    """Make ``path`` this user's own 0700 folder, or refuse one that is not: its name is
    predictable (the job id), and another user who made it first could swap what the engine
    loads from it. RuntimeError says why."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise RuntimeError(f"{path} exists and is not this user's private folder (owner uid {info.st_uid}, "
                           f"mode {stat.filemode(info.st_mode)}): remove it, or ask the node's admin to")
    return path


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

    def start(self, cache_dir: str | None = None) -> None:
        """Start it; ``cache_dir`` is the compile cache setting (see :func:`cache_env`)."""
        os.makedirs(os.path.join(self.tmp_dir, "tmp"), mode=0o700, exist_ok=True)
        env = {**os.environ, **dict(self.process.env)}
        env.update(cache_env(cache_dir, env))
        env.update({"TMPDIR": os.path.join(self.tmp_dir, "tmp"), MARKER: self.marker,
                    "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1"})
        log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            self.popen = subprocess.Popen(list(self.process.argv), env=env, stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True, preexec_fn=_parent_death_hook())
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
        _signal_all(marked_pids(self.marker), signal.SIGKILL)
        # a killed process still maps its /dev/shm files until it is gone: the cleanup that
        # follows spares files in use, so wait (bounded) until none of ours is left
        wait_until(lambda: not marked_pids(self.marker), 10)


def cache_env(cache_dir: str | None, environ: dict[str, str]) -> dict[str, str]:
    """Where vLLM's compile cache and torch's inductor cache go: one folder per user, shared by
    deployments and kept between jobs, so that the next start of a model skips torch.compile.

    ``cache_dir`` (the ``cache_dir`` setting) wins; else the user's own ``VLLM_CACHE_ROOT``; else
    vLLM's default (``~/.cache/vllm``). ``TORCHINDUCTOR_CACHE_DIR`` follows it unless the user
    set one (torch's default lies under TMPDIR, which is per job)."""
    root = os.path.expanduser(cache_dir or environ.get("VLLM_CACHE_ROOT") or
                              os.path.join(environ.get("XDG_CACHE_HOME") or
                                           os.path.join(os.path.expanduser("~"), ".cache"), "vllm"))
    inductor = environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(root, "inductor")
    for folder in (root, inductor):
        os.makedirs(folder, mode=0o700, exist_ok=True)
    return {"VLLM_CACHE_ROOT": root, "TORCHINDUCTOR_CACHE_DIR": inductor}


def _parent_death_hook():
    """A function for the child to run before exec: it gets PARENT_DEATH_SIGNAL when the agent
    (the thread that started it) dies. None where prctl is missing (not Linux): there the next
    agent's sweep ends what a dead agent left. libc is looked up here, not after the fork."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    signum = int(PARENT_DEATH_SIGNAL)
    return lambda: prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)


def marked_processes(prefix: str = "") -> dict[int, str]:
    """{pid: marker} of this user's processes whose marker starts with ``prefix``."""
    needle = f"\0{MARKER}={prefix}".encode()
    found: dict[int, str] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid != os.getuid():
                continue
            with open(f"/proc/{name}/environ", "rb") as handle:
                environ = b"\0" + handle.read()
        except OSError:
            continue
        at = environ.find(needle)
        if at >= 0:
            found[int(name)] = environ[at + len(MARKER) + 2:].split(b"\0", 1)[0].decode(errors="replace")
    return found


def marked_pids(marker: str) -> list[int]:
    """Our own processes whose environment carries exactly ``marker``."""
    return [pid for pid, value in marked_processes(marker).items() if value == marker]


def end_leftovers(live_jobs: set[str] | None, own_job: str, prefix: str = "") -> dict[str, list[int]]:
    """End the processes that agents of ended jobs left on this node (an agent killed with SIGKILL
    cannot stop its engine): only this user's, only those with our marker, never ``own_job``'s.
    A Slurm job counts as ended when it is not in ``live_jobs`` (all of this user's jobs Slurm
    knows; None: Slurm cannot say, so none is touched), a local one when its controller is gone.
    ``prefix`` limits it to markers that start with it. Returns {marker: pids} of what was ended."""
    left: dict[str, list[int]] = {}
    for pid, marker in marked_processes(prefix).items():
        job = marker.partition("/")[0]
        if job == own_job or not _job_gone(job, live_jobs):
            continue
        left.setdefault(marker, []).append(pid)
    pids = [pid for group in left.values() for pid in group]
    _signal_all(pids, signal.SIGTERM)
    if not wait_until(lambda: not any(_alive(pid) for pid in pids), 3.0):
        _signal_all(pids, signal.SIGKILL)
    return left


def _signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except OSError:
            pass


def _job_gone(job: str, live_jobs: set[str] | None) -> bool:
    """Whether job ``job`` has ended; a local job id names its controller's pid."""
    if job.isdigit():
        return live_jobs is not None and job not in live_jobs
    if job.startswith("local-") and job[6:].isdigit():
        return not _alive(int(job[6:]))
    return False


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, which PID 1 may reap lazily, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return handle.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def shm_files() -> set[str]:
    """/dev/shm files of the kinds vLLM and torch leave behind."""
    return {path for pattern in SHM_PATTERNS for path in glob.glob(os.path.join("/dev/shm", pattern))}


def shm_in_use(pids: list[int]) -> set[str]:
    """The /dev/shm files that processes ``pids`` have open or mapped."""
    found: set[str] = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as maps:
                found |= {line.split(None, 5)[5].strip() for line in maps
                          if "/dev/shm/" in line and len(line.split(None, 5)) == 6}
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("/dev/shm/"):
                    found.add(target)
        except OSError:
            continue
    return {path.removesuffix(" (deleted)") for path in found}


def clean_node(tmp_dir: str, shm_before: set[str]) -> None:
    """Remove the deployment's temp dir and the /dev/shm files our processes left: new since the
    start and in use by no process of this user now (a neighbouring deployment of the same user
    keeps the files its processes hold)."""
    left = shm_files() - shm_before
    busy = shm_in_use(_own_pids()) if left else set()
    for path in left - busy:
        try:
            if os.stat(path).st_uid == os.getuid():
                os.unlink(path)
        except OSError:
            pass
    shutil.rmtree(tmp_dir, ignore_errors=True)


def _own_pids() -> list[int]:
    """This user's processes, this one excepted."""
    pids = []
    for name in os.listdir("/proc"):
        try:
            if name.isdigit() and int(name) != os.getpid() and os.stat(f"/proc/{name}").st_uid == os.getuid():
                pids.append(int(name))
        except OSError:
            continue
    return pids


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
