"""Talking to Slurm's command-line tools. Everything here tolerates Slurm being absent."""

from __future__ import annotations

import os
import re

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
