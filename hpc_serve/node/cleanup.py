"""What a job leaves on a node, and taking it away: its private temp folder, the /dev/shm files
vLLM and torch leave when killed, and what agents of ended jobs left (engines, temp folders).

Apart from hpc_serve.node.engine (which starts and stops processes) because this is about what
remains once they are gone, on the filesystem or from an agent that was killed. Stdlib only.
"""

from __future__ import annotations

import glob
import os
import shutil
import stat
import time
from typing import Callable

from .engine import end_leftovers, own_pids
from .runtime import TMP_PREFIX, TMP_ROOT

#: /dev/shm files vLLM and torch leave behind when killed (see docs/engine.md).
SHM_PATTERNS = ("psm_*", "sem.mp-*", "vllm*")
#: A file of those that no process of ours holds is garbage once this old (a younger one may be a
#: neighbouring deployment's, between creating it and opening it).
STALE_SHM_S = 60.0


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


def remove_unused_shm(paths: set[str]) -> list[str]:
    """Unlink the files of ``paths`` that are this user's and that no process of this user has
    open or mapped (a neighbouring deployment of the same user keeps the files its processes
    hold); return those removed."""
    busy = shm_in_use(own_pids()) if paths else set()
    removed = []
    for path in sorted(paths - busy):
        try:
            if os.stat(path).st_uid == os.getuid():
                os.unlink(path)
                removed.append(path)
        except OSError:
            pass
    return removed


def stale_shm_files(now: float | None = None) -> set[str]:
    """The /dev/shm files of our kinds older than STALE_SHM_S: a job killed before its agent
    cleaned up (Slurm's SIGKILL after KillWait, the OOM killer) left the ones nobody holds."""
    now = time.time() if now is None else now
    stale = set()
    for path in shm_files():
        try:
            if now - os.stat(path).st_mtime > STALE_SHM_S:
                stale.add(path)
        except OSError:
            continue
    return stale


def clean_node(tmp_dir: str, shm_before: set[str]) -> None:
    """Remove the deployment's temp dir and the /dev/shm files our processes left: new since the
    start and in use by no process of this user now."""
    remove_unused_shm(shm_files() - shm_before)
    shutil.rmtree(tmp_dir, ignore_errors=True)


def sweep_stale_tmp(live_jobs: set[str], root: str = TMP_ROOT) -> list[str]:
    """Remove ``hs-<job>`` temp dirs of ours whose Slurm job is not live on this node any more (an
    agent killed with SIGKILL cannot clean up after itself); return what was removed."""
    removed = []
    for name in sorted(os.listdir(root)):
        job = name[len(TMP_PREFIX):]
        path = os.path.join(root, name)
        if not name.startswith(TMP_PREFIX) or not job.isdigit() or job in live_jobs:
            continue
        try:
            if os.lstat(path).st_uid != os.getuid() or not os.path.isdir(path):
                continue
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def sweep_leftovers(job_id: str, log: Callable[[str], None]) -> None:
    """Remove the stale /dev/shm files nobody holds; end the engines and remove the temp dirs that
    killed agents of this user's ended jobs left on this node (a job Slurm still has, anywhere, is
    never touched; nor anything when squeue cannot say)."""
    from ..slurm import user_jobs

    removed = remove_unused_shm(stale_shm_files())
    if removed:
        log(f"removed {len(removed)} /dev/shm file(s) that no process holds ({', '.join(map(os.path.basename, removed[:4]))}"
            f"{', ...' if len(removed) > 4 else ''}), left by a job killed before it cleaned up")
    live = user_jobs()
    for marker, pids in end_leftovers(live, job_id).items():
        log(f"ended {len(pids)} process(es) of {marker} (pids {', '.join(map(str, pids))}), left by "
            "an agent of a job that has ended")
    if live is not None and job_id.isdigit():
        for path in sweep_stale_tmp(live | {job_id}):
            log(f"removed {path}, left by an earlier job that has ended")
