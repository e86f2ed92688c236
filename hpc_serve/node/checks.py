"""What one node checks about itself before any engine starts: the GPUs Slurm gave and that no
other process holds the memory vLLM will ask of them, the model, free space where the caches and
temp files go, /dev/shm, and temp paths short enough for Unix sockets. Each check returns a
problem (one line naming the node and the fix) or None, and the figures it read go into the
node's preflight record. Stdlib only; milliseconds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any, Mapping

from ..planner.model_info import hub_snapshot, weight_files
from ..planner.spec import DeploymentSpec
from ..planner.vllm_parser import passed_value

GIB, MIB = 1 << 30, 1 << 20
#: Free space a start needs: the compile caches (vLLM's and torch's, kept between jobs), the
#: job's temp folder (Ray's session, vLLM's sockets and temp files), and /dev/shm (vLLM's
#: shared-memory queues between its processes, Ray's object store).
MIN_CACHE_FREE, MIN_TMP_FREE, MIN_SHM_FREE = 1 * GIB, 256 * MIB, 256 * MIB
#: The longest Unix socket path Linux takes (sun_path: 108 bytes with the NUL), and how much
#: Ray adds to its temp folder (``session_<date>_<time>_<pid>/sockets/plasma_store``), with room.
SOCKET_PATH_MAX, SOCKET_SUFFIX = 107, 72
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
#: vLLM's default share of each GPU's memory (``--gpu-memory-utilization``).
DEFAULT_GPU_SHARE = 0.9
GPU_QUERY = ["nvidia-smi", "--query-gpu=index,uuid,memory.used,memory.total", "--format=csv,noheader,nounits"]
HOLDERS_QUERY = ["nvidia-smi", "--query-compute-apps=gpu_uuid,pid,used_memory", "--format=csv,noheader,nounits"]


def gpu_problem(where: str, per_node: int, environ: Mapping[str, str]) -> str | None:
    """The GPUs this node sees must be as many as the layout needs (Slurm's count is checked
    against the layout on joining; this is what CUDA will see)."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if per_node <= 0 or visible is None:
        return None
    devices = [d for d in visible.split(",") if d.strip()]
    if not devices:
        return (f"{where} has no GPU: CUDA_VISIBLE_DEVICES is empty. Ask Slurm for GPUs "
                f"(--gpus-per-node {per_node}) and do not clear CUDA_VISIBLE_DEVICES in --setup")
    if len(devices) < per_node:
        return (f"{where} sees {len(devices)} GPU(s) (CUDA_VISIBLE_DEVICES={visible}) but the layout "
                f"needs {per_node} per node: resubmit with --gpus-per-node {len(devices)}")
    return None


def gpu_share(vllm_args: tuple[str, ...] | list[str]) -> float | None:
    """The share of each GPU's memory vLLM will ask for: ``--gpu-memory-utilization`` as vLLM reads
    it, else 0.9; None where it cannot be known here (a --config file, a value vLLM will refuse)."""
    if passed_value(list(vllm_args), "config") is not None:
        return None
    value = passed_value(list(vllm_args), "gpu_memory_utilization")
    if value is None:
        return DEFAULT_GPU_SHARE
    try:
        return float(value)
    except ValueError:
        return None


def _csv_rows(text: str, fields: int) -> list[list[str]]:
    rows = [[cell.strip() for cell in line.split(",")] for line in text.splitlines() if line.strip()]
    return [row for row in rows if len(row) == fields]


def gpu_memory_problems(where: str, visible: str | None, share: float, gpus_text: str, holders_text: str = "",
                        per_node: int = 0) -> tuple[list[str], list[float]]:
    """The GPUs of this job (``visible``: CUDA_VISIBLE_DEVICES, indices or UUIDs; None: the first
    ``per_node``, which CUDA will use) whose free memory is less than vLLM will ask for (``share``
    of each), as vLLM's own start-up check would find a minute later; and each one's free GiB.
    From nvidia-smi's CSV (GPU_QUERY and HOLDERS_QUERY); a device nvidia-smi does not list (a MIG
    instance) is not checked."""
    wanted = None if visible is None else {d.strip() for d in visible.split(",") if d.strip()}
    holders: dict[str, list[str]] = {}
    for uuid, pid, used in _csv_rows(holders_text, 3):
        holders.setdefault(uuid, []).append(f"pid {pid} ({used} MiB)")
    problems, free_gib = [], []
    rows = _csv_rows(gpus_text, 4)
    for index, uuid, used, total in rows if wanted is not None else rows[:per_node]:
        if wanted is not None and index not in wanted and uuid not in wanted:
            continue
        try:
            free, size = (float(total) - float(used)) / 1024, float(total) / 1024
        except ValueError:
            continue
        free_gib.append(round(free, 2))
        if free < share * size:
            held = f" ({', '.join(holders[uuid])})" if holders.get(uuid) else ""
            problems.append(f"GPU {index} on {where} has {free:.1f} of {size:.1f} GiB free, and vLLM will ask for "
                            f"{share * size:.1f} GiB (--gpu-memory-utilization {share:g}): another process holds "
                            f"it{held}. End it (nvidia-smi shows it), or pass a lower -- --gpu-memory-utilization")
    return problems, free_gib


def nvidia_smi(args: list[str]) -> str | None:
    """nvidia-smi's output for ``args`` (None: no nvidia-smi, or it failed)."""
    if shutil.which(args[0]) is None:
        return None
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def nvidia_gpus() -> int | None:
    """How many GPUs `nvidia-smi -L` lists on this node (None: no nvidia-smi, or it failed)."""
    listed = nvidia_smi(["nvidia-smi", "-L"])
    return None if listed is None else sum(line.startswith("GPU ") for line in listed.splitlines())


def is_local_path(model: str) -> bool:
    """Whether ``model`` names a folder (vLLM's rule: a path that exists; else a Hub id)."""
    return os.path.isabs(model) or model.startswith(("./", "../", "~")) or os.path.isdir(model)


def model_problem(where: str, model: str, environ: Mapping[str, str]) -> str | None:
    """The model must be readable here: a folder with config.json and weights, or (on a node
    without the Hub) in the Hugging Face cache. A model from the Hub, online, is not checked."""
    if is_local_path(model):
        folder = os.path.expanduser(model)
        if not os.path.isdir(folder):
            return (f"model folder {model} is not on {where}: put it on a filesystem every node "
                    "sees, or copy it to the same path on every node")
    elif any(environ.get(name, "") not in ("", "0") for name in OFFLINE_VARIABLES):
        folder = hub_snapshot(model, environ) or ""
        if not folder:
            return (f"{model} is not in the Hugging Face cache on {where} and the node is offline "
                    "(HF_HUB_OFFLINE): fetch it into a cache every node sees (`hpc-serve fetch MODEL "
                    "--hf-home DIR`, then submit with --hf-home DIR --offline), or pass the folder")
    else:
        return None
    config = os.path.join(folder, "config.json")
    if not os.access(config, os.R_OK):
        return f"{config} is missing or unreadable on {where}: is {model} a model folder?"
    weights = weight_files(folder)
    if weights and not all(os.access(path, os.R_OK) for path in weights):
        return f"the weights in {folder} are not readable on {where}: check their permissions"
    return None


def free_bytes(path: str) -> int | None:
    """Free bytes on the filesystem of ``path`` (or its nearest existing parent)."""
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path or "/").free
    except OSError:
        return None


def space_problems(where: str, places: Mapping[str, tuple[str, int]]) -> tuple[list[str], dict[str, float]]:
    """Problems and free GiB for each named place: ``{name: (path, bytes needed)}``."""
    problems, figures = [], {}
    for name, (path, needed) in places.items():
        free = free_bytes(path)
        if free is None:
            continue
        figures[f"{name}_free_gib"] = round(free / GIB, 2)
        if free < needed:
            problems.append(f"{where}: only {free / MIB:.0f} MiB free in {path} ({name}); a start needs "
                            f"{needed / MIB:.0f} MiB: free some space" +
                            (", or point --cache-dir elsewhere" if name == "cache" else
                             " (ask for a larger /dev/shm, e.g. a container's --shm-size)" if name == "shm" else ""))
    return problems, figures


def socket_path_problem(where: str, tmp_dir: str) -> str | None:
    """Ray's and vLLM's Unix sockets live under the job's temp folder: it must be short."""
    longest = len(os.path.join(tmp_dir, "ray")) + SOCKET_SUFFIX
    if longest > SOCKET_PATH_MAX:
        return (f"the temp folder {tmp_dir} on {where} is too long for Unix sockets ({longest} > "
                f"{SOCKET_PATH_MAX} bytes with Ray's session path): use a shorter TMPDIR")
    return None


def node_checks(spec: DeploymentSpec, where: str, tmp_dir: str, cache_root: str,
                environ: Mapping[str, str]) -> tuple[list[str], dict[str, Any]]:
    """Every check of this node: (problems, figures)."""
    env = {**environ, **dict(spec.env)}
    per_node = spec.layout.gpus_per_node
    problems = [p for p in (gpu_problem(where, per_node, env), model_problem(where, spec.model, env),
                            socket_path_problem(where, tmp_dir)) if p]
    seen = nvidia_gpus()
    if seen is not None and seen < per_node:
        problems.append(f"{where}: nvidia-smi lists {seen} GPU(s) but the layout needs {per_node} per node")
    space, figures = space_problems(where, {"cache": (cache_root, MIN_CACHE_FREE), "tmp": (tmp_dir, MIN_TMP_FREE),
                                            "shm": ("/dev/shm", MIN_SHM_FREE)})
    figures["gpus"] = seen if seen is not None else env.get("CUDA_VISIBLE_DEVICES")
    share = gpu_share(spec.vllm_args)
    gpus_text = nvidia_smi(GPU_QUERY) if seen and per_node > 0 and share is not None else None
    if gpus_text:
        visible = env.get("CUDA_VISIBLE_DEVICES")
        held, figures["gpu_free_gib"] = gpu_memory_problems(where, visible, share, gpus_text, per_node=per_node)
        if held:  # ask again, now with the processes that hold them
            held, _ = gpu_memory_problems(where, visible, share, gpus_text, nvidia_smi(HOLDERS_QUERY) or "", per_node)
        problems += held
    return problems + space, figures
