"""Talking to Slurm's command-line tools. Everything here tolerates Slurm being absent."""

from __future__ import annotations

import os
import re

from .errors import HpcServeError

_GPU_GRES = re.compile(r"gpu(?::[^:,()]+)?:(\d+)")


def parse_gres_gpus(text: str) -> int | None:
    """The largest GPU count in sinfo's %G output ('gpu:a100:4(S:0-1),gpu:8'), or None."""
    counts = [int(n) for n in _GPU_GRES.findall(text)]
    return max(counts) if counts else None


def which(command: str) -> str | None:
    """The path of ``command`` on PATH, or None (shutil.which without shutil's import cost)."""
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = os.path.join(folder, command)
        if folder and os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return candidate
    return None


def partition_gpus_per_node(partition: str | None) -> tuple[int, str] | None:
    """(GPUs per node, source) as sinfo reports them, or None when sinfo is absent or silent."""
    if which("sinfo") is None:
        return None
    import subprocess

    argv = ["sinfo", "--noheader", "--format=%G"] + (["--partition", partition] if partition else [])
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    gpus = parse_gres_gpus(done.stdout) if done.returncode == 0 else None
    if not gpus:
        return None
    return gpus, f"sinfo ({'partition ' + partition if partition else 'default partition'})"


def queue_states(job_ids: list[str]) -> dict[str, tuple[str, str]] | None:
    """{job id: (state, reason)} for jobs still known to squeue; None when squeue is absent."""
    if which("squeue") is None:
        return None
    import subprocess

    wanted = sorted({j for j in job_ids if j.isdigit()})
    if not wanted:
        return {}
    try:
        done = subprocess.run(["squeue", "--noheader", "--all", "--format=%i|%T|%r", "--jobs", ",".join(wanted)],
                              capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    states: dict[str, tuple[str, str]] = {}
    for line in done.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            states[parts[0]] = (parts[1], parts[2])
    return states


def queue_position(job_id: str) -> int | None:
    """1 for the pending job Slurm will start next in ``job_id``'s partition, 2 after it, ..."""
    if which("squeue") is None or not job_id.isdigit():
        return None
    import subprocess

    try:
        mine = subprocess.run(["squeue", "--noheader", "--format=%P", "--jobs", job_id],
                              capture_output=True, text=True, timeout=15, check=False).stdout.strip()
        done = subprocess.run(["squeue", "--noheader", "--all", "--states=PENDING", "--sort=-p,i",
                               "--format=%i", "--partition", mine or ""],
                              capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    order = done.stdout.split()
    return order.index(job_id) + 1 if job_id in order else None


def accounting_states(job_ids: list[str]) -> dict[str, str]:
    """{job id: final state} from one sacct call; empty without accounting."""
    wanted = sorted({j for j in job_ids if j.isdigit()})
    if not wanted or which("sacct") is None:
        return {}
    import subprocess

    try:
        done = subprocess.run(["sacct", "--noheader", "--parsable2", "--allocations",
                               "--format=JobID,State", "--jobs", ",".join(wanted)],
                              capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if done.returncode != 0:  # e.g. "Slurm accounting storage is disabled"
        return {}
    pairs = (line.split("|", 1) for line in done.stdout.splitlines() if "|" in line)
    return {job: state.split()[0] for job, state in pairs if state}


def scancel(job_id: str) -> None:
    """Cancel a Slurm job; HpcServeError with scancel's reason when it refuses."""
    import subprocess

    if which("scancel") is None:
        raise HpcServeError("scancel is not on PATH.", "Run this on the cluster's login node.")
    done = subprocess.run(["scancel", job_id], capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise HpcServeError(f"scancel {job_id} failed: {done.stderr.strip()}",
                            "Check the job with 'squeue -j JOBID'.")


def _scontrol(*args: str, timeout_s: float = 30) -> tuple[int, str]:
    """(exit code, output or error) of one scontrol call; (127, reason) when it cannot run."""
    import subprocess

    if which("scontrol") is None:
        return 127, "scontrol is not on PATH"
    try:
        done = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=timeout_s,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 1, str(exc)
    return done.returncode, (done.stdout if done.returncode == 0 else done.stderr).strip()


def requeue(job_id: str) -> str | None:
    """Ask Slurm to requeue ``job_id`` (it ends this run and queues the job again); None when it
    accepted, else its reason."""
    code, text = _scontrol("requeue", job_id)
    return None if code == 0 else text or f"scontrol requeue exited with {code}"


def user_jobs() -> set[str] | None:
    """The ids of every job of this user that Slurm still has (None when squeue cannot say)."""
    import subprocess

    if which("squeue") is None:
        return None
    try:
        done = subprocess.run(["squeue", "--noheader", "--all", "--user", str(os.getuid()), "--format=%i"],
                              capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {job.split("_")[0] for job in done.stdout.split()} if done.returncode == 0 else None


def job_fields(job_id: str, timeout_s: float = 30) -> dict[str, str]:
    """``scontrol show job``'s Key=Value fields of ``job_id`` ({} when it cannot say)."""
    code, text = _scontrol("show", "job", "--oneliner", job_id, timeout_s=timeout_s)
    return dict(re.findall(r"(\w+)=(\S*)", text)) if code == 0 else {}


def parse_duration(text: str) -> float | None:
    """Seconds in Slurm's [D-]HH:MM:SS / MM:SS (squeue's %L); None for UNLIMITED and the like."""
    found = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", text.strip())
    if not found:
        return None
    days, hours, minutes, seconds = (int(part or 0) for part in found.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def time_left(job_id: str) -> float | None:
    """Seconds until ``job_id`` reaches its time limit (None without a limit or squeue)."""
    import subprocess

    if which("squeue") is None:
        return None
    try:
        done = subprocess.run(["squeue", "--noheader", "--jobs", job_id, "--format=%L"],
                              capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_duration(done.stdout) if done.returncode == 0 else None
