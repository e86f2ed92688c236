"""The deployment registry: one folder per deployment on the shared filesystem.

    <home>/deployments/<job id>/
        spec.json  plan.json  job.json  state.json  nodes/<rank>.json  logs/node-<rank>.log
        endpoint.json  timings/<rank>.json  beats/<rank>.json  preflight/<rank>.json
        api_key  ray.json  ray_token  bench/<time>.json (hpc-serve bench)
        members.json (a group's router: hpc_serve.fleet)

Folders are 0700 and files 0600 (they will hold API keys). Every write is atomic (temp file,
fsync, rename) and retried on a stale NFS handle. Stdlib only: the node agent uses it too.
"""

from __future__ import annotations

import errno
import json
import os
import time
from dataclasses import dataclass
from typing import Any

from .errors import HpcServeError

#: The files and folders of one deployment's folder (every module names them through these).
SPEC, PLAN, JOB, STATE, ENDPOINT = "spec.json", "plan.json", "job.json", "state.json", "endpoint.json"
API_KEY, RAY, RAY_TOKEN, CANCEL = "api_key", "ray.json", "ray_token", "cancel.json"
NODES, LOGS, TIMINGS, BEATS, ENDS, PREFLIGHT = "nodes", "logs", "timings", "beats", "ends", "preflight"
BENCH = "bench"
#: A group's router entry: who is in the router now (hpc_serve.fleet.keeper writes it), and the
#: ``kind`` in its job.json.
MEMBERS, ROUTER = "members.json", "router"

PHASES = ("PENDING", "STARTING", "LOADING", "READY", "RESTARTING", "FAILED", "STOPPED", "TIMEOUT")
TERMINAL = ("FAILED", "STOPPED", "TIMEOUT")
_RETRIES = 5


def registry_root(home: str | None = None) -> str:
    """The registry folder: $HPC_SERVE_HOME, else ``home`` (a setting), else ~/.hpc-serve."""
    return os.path.expanduser(os.environ.get("HPC_SERVE_HOME") or home or "~/.hpc-serve")


def _retry(action, *args):
    for attempt in range(_RETRIES):
        try:
            return action(*args)
        except OSError as exc:
            if exc.errno != errno.ESTALE or attempt == _RETRIES - 1:
                raise
            time.sleep(0.05 * 2 ** attempt)  # back off, then retry the stale handle


def _write_atomic(path: str, text: str) -> None:
    folder = os.path.dirname(path)
    temp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{time.monotonic_ns()}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


def write_json(path: str, data: Any) -> None:
    """Atomically replace ``path`` with ``data`` as JSON (0600), retrying stale NFS handles."""
    _retry(_write_atomic, path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def create_json(path: str, data: Any) -> bool:
    """Write ``path`` only if it does not exist yet; return whether this call wrote it."""
    temp = f"{path}.{os.getpid()}.{time.monotonic_ns()}.new"
    _retry(_write_atomic, temp, json.dumps(data, indent=2, sort_keys=True) + "\n")
    try:
        os.link(temp, path)  # atomic "create if absent", also on NFS
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(temp)


class CorruptRecord(HpcServeError):
    """A registry file that exists but cannot be parsed."""


def read_json(path: str, default: Any = None) -> Any:
    """``path`` parsed, ``default`` when missing; CorruptRecord when unreadable."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return default
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptRecord(f"{path} is corrupt ({exc}).",
                            "Inspect or delete that file; the job itself is not affected.") from None


def _mkdir_private(path: str) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)


@dataclass(frozen=True)
class Deployment:
    """One deployment's folder and what is recorded in it."""

    root: str
    id: str

    @property
    def path(self) -> str:
        return os.path.join(self.root, "deployments", self.id)

    def file(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    def ensure(self) -> "Deployment":
        for sub in ("", NODES, LOGS, PREFLIGHT):
            _mkdir_private(self.file(sub) if sub else self.path)
        return self

    def read(self, name: str, default: Any = None) -> Any:
        return read_json(self.file(name), default)

    def write(self, name: str, data: Any) -> None:
        write_json(self.file(name), data)

    def rank_file(self, folder: str, rank: int) -> str:
        """The name of rank ``rank``'s record in ``folder`` (NODES, TIMINGS, BEATS, ENDS)."""
        return f"{folder}/{rank}.json"

    def rank_records(self, folder: str) -> dict[int, dict]:
        """Every rank's record in ``folder``, by rank (a corrupt one is skipped)."""
        records, path = {}, self.file(folder)
        for name in sorted(os.listdir(path)) if os.path.isdir(path) else ():
            if name.endswith(".json") and name[:-5].isdigit():
                try:
                    records[int(name[:-5])] = read_json(os.path.join(path, name), {}) or {}
                except CorruptRecord:
                    continue
        return records

    @property
    def job(self) -> dict:
        """What submission recorded (job.json): executor, Slurm job id, name, predecessor, ..."""
        return self.read(JOB, {}) or {}

    @property
    def slurm_job_id(self) -> str:
        """The scheduler's id of this deployment's job (the deployment id unless job.json says)."""
        job = self.job
        return str(job.get("slurm_job_id") or job.get("job_id") or self.id)

    @property
    def spec(self) -> dict:
        """The deployment's spec as recorded (spec.json)."""
        return self.read(SPEC, {}) or {}

    def mark_cancel(self) -> None:
        """What `hpc-serve cancel` writes before it asks Slurm: the agents then know who ended them."""
        self.write(CANCEL, {"at": time.time()})

    @property
    def state(self) -> dict:
        return self.read(STATE, {}) or {}

    @property
    def phase(self) -> str:
        return self.state.get("phase", "PENDING")

    def set_phase(self, phase: str, reason: str = "", **extra: Any) -> None:
        """Record a phase change, keeping the history (and every failure reason)."""
        assert phase in PHASES, phase
        state = self.read(STATE, {}) or {}
        now = time.time()
        history = state.get("history", []) + [{"phase": phase, "at": now, "reason": reason}]
        self.write(STATE, {**state, **extra, "phase": phase, "reason": reason,
                                  "updated": now, "history": history})

    def init_phase(self, phase: str, reason: str = "") -> bool:
        """Write the first state unless a node already wrote one (returns whether it wrote)."""
        now = time.time()
        return create_json(self.file(STATE), {
            "phase": phase, "reason": reason, "updated": now,
            "history": [{"phase": phase, "at": now, "reason": reason}]})

    def nodes(self, restart: int | None = None) -> dict[int, dict]:
        """Node records by rank; with ``restart``, only those of that run of the job (a requeued
        job runs again under the same id, and its earlier records stay until overwritten)."""
        return {rank: record for rank, record in self.rank_records(NODES).items()
                if restart is None or record.get("restart", 0) == restart}

    def remove(self, name: str) -> None:
        """Delete file ``name`` if it is there."""
        try:
            os.unlink(self.file(name))
        except FileNotFoundError:
            pass

    def log_path(self, rank: int) -> str:
        return self.file(LOGS, f"node-{rank}.log")

    def create_secret(self, name: str) -> str:
        """A fresh random secret in file ``name`` (0600, in the 0700 folder), or the one there."""
        import secrets

        path = self.file(name)
        temp = f"{path}.{os.getpid()}.{time.monotonic_ns()}.new"
        _retry(_write_atomic, temp, secrets.token_hex(32))
        try:
            os.link(temp, path)  # atomic "create if absent": readers never see a partial file
        except FileExistsError:
            pass
        finally:
            os.unlink(temp)
        return self.read_secret(name)

    def write_secret(self, name: str, value: str) -> None:
        """Put ``value`` in file ``name`` (0600, atomic), replacing what was there."""
        _retry(_write_atomic, self.file(name), value)

    def read_secret(self, name: str) -> str:
        """The secret in file ``name`` ('' when there is none)."""
        try:
            with open(self.file(name), encoding="utf-8") as handle:
                return handle.read().strip()
        except FileNotFoundError:
            return ""

    @property
    def endpoint(self) -> dict:
        """The published endpoint (url, host, port, model, served_model, api_key_file), or {}."""
        return self.read(ENDPOINT, {}) or {}

    @property
    def api_key(self) -> str:
        """The endpoint's API key ('' when it was started with --no-api-key)."""
        return self.read_secret(API_KEY)


class Registry:
    """All deployments under one root."""

    def __init__(self, root: str) -> None:
        self.root = root

    def check_writable(self) -> None:
        """Fail early, before submitting, when the registry cannot be written."""
        folder = os.path.join(self.root, "deployments")
        try:
            _mkdir_private(self.root)
            _mkdir_private(folder)
            probe = os.path.join(folder, f".probe.{os.getpid()}")
            with open(probe, "w"):
                pass
            os.unlink(probe)
        except OSError as exc:
            raise HpcServeError(f"The registry folder {self.root} is not writable ({exc.strerror}).",
                                "Set HPC_SERVE_HOME or 'home' in your config to a writable shared folder.") from None

    def deployment(self, deployment_id: str) -> Deployment:
        return Deployment(self.root, deployment_id)

    def all(self) -> list[Deployment]:
        folder = os.path.join(self.root, "deployments")
        if not os.path.isdir(folder):
            return []
        ids = [n for n in os.listdir(folder) if not n.startswith(".")]
        return [Deployment(self.root, i) for i in sorted(ids, key=_id_order)]

    def find(self, key: str) -> Deployment:
        """A deployment by job id or by name (the newest of that name)."""
        direct = self.deployment(key)
        if os.path.isdir(direct.path):
            return direct
        named = []
        for dep in self.all():
            try:
                name = dep.job.get("name")
            except CorruptRecord:
                continue
            if name == key:
                named.append(dep)
        if named:
            return named[-1]
        raise HpcServeError(f"No deployment {key!r} in {self.root}.",
                            "List them with 'hpc-serve list --all'.")


def _id_order(value: str) -> tuple[int, str]:
    digits = "".join(ch for ch in value if ch.isdigit())
    return (int(digits) if digits else 0, value)
