"""Known errors on a real GPU: vLLM and Ray made to fail the ways users see, each diagnosed by the
catalogue (`hpc_serve/node/diagnosis.py`).

Through hpc-serve (`submit --executor local`): the deployment is FAILED and its reason leads with the
catalogue's line. Through the programs alone (what hpc-serve's own checks would stop first): the
catalogue finds the entry in their output. Where HPC_SERVE_GPU_CAPTURE names a folder, each log's
end is written there as `<key>.gpu.log` (paths shortened): the fixtures of tests/unit/known_errors.
"""

import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from hpc_serve.node.diagnosis import diagnose, find_known

from ..cluster.helpers import read_state, run_cli, wait_for
from .test_gpu import ENGINE, MODEL, RAY, gpu_memory_used_mib

pytestmark = pytest.mark.gpu
CAPTURE = os.environ.get("HPC_SERVE_GPU_CAPTURE")
GiB = 1 << 30


def tail_from_first_error(text: str, most: int = 60) -> list[str]:
    """The log from its first error line (at most ``most`` lines, and never without the known
    error's own line), as the fixtures keep it."""
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines) if re.search(r"ERROR|Error|error:", line)), None)
    known = next((i for i, line in enumerate(lines) if find_known([line])), None)
    if known is not None and (first is None or known - first >= most - 5):
        first = max(0, known - 5)
    start = max(0, len(lines) - most) if first is None else first
    return lines[start:start + most]


#: Where this Python finds packages (PYTHONPATH entries too), longest first: shortened in the fixtures.
PACKAGE_ROOTS = sorted((p.rstrip("/") + "/" for p in sys.path if p.startswith("/") and len(p) > 1), key=len,
                       reverse=True)


def shorten(line: str, model: str, scratch: str) -> str:
    """No path of the machine that ran it: installed packages, the model and temp folders shortened."""
    line = line.replace(model, "MODEL").replace(scratch, "/tmp/job")
    for root in PACKAGE_ROOTS:
        line = line.replace(root, "site-packages/")
    return re.sub(r"/\S*?/(site|dist)-packages/", "site-packages/", line)


def keep(key: str, text: str, scratch: Path) -> list[str]:
    lines = [shorten(line, MODEL, str(scratch)) for line in tail_from_first_error(text)]
    if CAPTURE:
        Path(CAPTURE).mkdir(parents=True, exist_ok=True)
        Path(CAPTURE, f"{key}.gpu.log").write_text("\n".join(lines) + "\n")
    return lines


@pytest.fixture
def idle_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("HPC_SERVE_HOME", str(tmp_path / "registry"))
    monkeypatch.setenv("HPC_SERVE_PYTHON", sys.executable)
    idle = gpu_memory_used_mib()
    yield tmp_path / "registry"
    run_cli("cancel", "--all")
    wait_for(lambda: gpu_memory_used_mib() <= idle + 64, 90, "the GPU memory to be freed")


def holding_gpu_memory(fraction: float) -> subprocess.Popen:
    """Another process that holds ``fraction`` of the GPU's memory (a leftover engine, a neighbour)."""
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time, torch\n"
         "free, total = torch.cuda.mem_get_info()\n"
         f"x = torch.empty(int(total * {fraction}), dtype=torch.uint8, device='cuda')\n"
         "print('holding', flush=True)\ntime.sleep(3600)\n"],
        stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert holder.stdout.readline().strip() == "holding"
    return holder


@pytest.mark.parametrize("key, vllm_args, says", [
    ("kv-cache-too-small", ["--kv-cache-memory-bytes", str(1_000_000)],
     "the KV cache cannot hold one request of max_model_len 2048"),
    ("no-kv-cache-memory", ["--gpu-memory-utilization", "0.006"],
     "no memory was left for the KV cache once the weights were loaded"),
    ("cuda-out-of-memory", ["--kv-cache-memory-bytes", str(400 * GiB)], "CUDA ran out of GPU memory"),
    ("gpu-memory-taken", ["--gpu-memory-utilization", "0.5"], "only "),  # vLLM's words: the preflight is off
], ids=["kv-cache-too-small", "no-kv-cache-memory", "cuda-out-of-memory", "gpu-memory-taken"])
def test_a_deployment_that_fails_on_the_gpu_says_what_to_change(idle_gpu, tmp_path, key, vllm_args, says):
    holder = holding_gpu_memory(0.7) if key == "gpu-memory-taken" else None
    try:
        done = run_cli("submit", MODEL, "--executor", "local", "--gpus-per-node", "1", "--launcher", "mp",
                       "--engine-cmd", ENGINE, "--cache-dir", str(tmp_path / "cache"), "--timeout", "400",
                       *(["--no-preflight"] if holder else []),
                       "--", "--max-model-len", "2048", "--enforce-eager", *vllm_args, timeout=460)
    finally:
        if holder:
            os.killpg(holder.pid, 9)
            holder.wait()
    assert done.returncode != 0, done.stdout
    (job_id,) = [path.name for path in (idle_gpu / "deployments").iterdir()]  # this test's own registry
    state = read_state(idle_gpu, job_id)
    log = (idle_gpu / "deployments" / job_id / "logs" / "node-0.log").read_text()
    lines = keep(key, log, tmp_path)
    assert state["phase"] == "FAILED", state
    first = state["reason"].splitlines()[0]
    assert re.search(r"exited with code \d+: " + re.escape(says), first), first
    hit = find_known(lines)
    assert hit is not None and hit[0].key == key, (key, hit and hit[0].key, lines[-5:])
    assert diagnose(lines) in first


def test_the_preflight_finds_a_gpu_another_process_holds_before_vllm_starts(idle_gpu, tmp_path):
    holder = holding_gpu_memory(0.7)
    try:
        started = time.monotonic()
        done = run_cli("submit", MODEL, "--executor", "local", "--gpus-per-node", "1", "--launcher", "mp",
                       "--engine-cmd", ENGINE, "--timeout", "400", "--", "--max-model-len", "2048",
                       "--gpu-memory-utilization", "0.5", timeout=460)
        took = time.monotonic() - started
    finally:
        os.killpg(holder.pid, 9)
        holder.wait()
    assert done.returncode != 0, done.stdout
    (job_id,) = [path.name for path in (idle_gpu / "deployments").iterdir()]
    state = read_state(idle_gpu, job_id)
    assert state["phase"] == "FAILED" and "preflight" in state["reason"], state["reason"]
    assert re.search(r"GPU 0 on node 0 \(\S+\) has \d+\.\d of \d+\.\d GiB free, and vLLM will ask for", state["reason"])
    assert re.search(r"pid \d+ \(\d+ MiB\)", state["reason"]), state["reason"]  # (in a container: its host pid)
    log = (idle_gpu / "deployments" / job_id / "logs" / "node-0.log").read_text()
    assert "EngineCore" not in log, log[-2000:]  # no engine started: seconds, not vLLM's minute
    print(f"preflight caught the held GPU {took:.1f} s after submit")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_until_known(argv: list[str], env: dict, log: Path, seconds: float) -> str:
    """Run ``argv`` in its own session until it exits, prints a known error (then 3 s more, for the
    rest of its traceback) or ``seconds`` pass; end its process group; return its output."""
    with log.open("wb") as out:
        process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + seconds
        try:
            while process.poll() is None and time.monotonic() < deadline:
                if find_known(log.read_text(errors="replace").splitlines()):
                    time.sleep(3)
                    break
                time.sleep(0.5)
        finally:
            try:
                os.killpg(process.pid, 9)
            except ProcessLookupError:
                pass
            process.wait()
    return log.read_text(errors="replace")


def short_folder() -> str:
    """A temp folder short enough for Ray's Unix sockets (107 bytes)."""
    return tempfile.mkdtemp(prefix="hs-ray-", dir="/tmp")


def test_no_gpu_visible_is_diagnosed_from_vllms_and_rays_own_words(idle_gpu, tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "VLLM_CACHE_ROOT": str(tmp_path / "cache")}
    text = run_until_known([*shlex.split(ENGINE), MODEL, "--port", str(free_port()), "--max-model-len", "2048",
                           "--enforce-eager"], env, tmp_path / "vllm.log", 150)
    lines = keep("no-gpu", text, tmp_path)
    hit = find_known(lines)
    assert hit is not None and hit[0].key == "no-gpu", lines[-8:]
    ray = run_until_known([*shlex.split(RAY), "start", "--head", "--port", str(free_port()), "--num-gpus", "1",
                          "--temp-dir", short_folder()], env, tmp_path / "ray.log", 60)
    ray_lines = [shorten(line, MODEL, str(tmp_path)) for line in tail_from_first_error(ray)]
    if CAPTURE:
        Path(CAPTURE, "no-gpu.gpu-ray.log").write_text("\n".join(ray_lines) + "\n")
    hit = find_known(ray_lines)
    assert hit is not None and hit[0].key == "no-gpu", ray_lines[-8:]


def test_more_gpus_than_the_ray_cluster_has_is_diagnosed(idle_gpu, tmp_path):
    port = free_port()
    env = {**os.environ, "VLLM_CACHE_ROOT": str(tmp_path / "cache")}
    ray = [*shlex.split(RAY)]
    started = subprocess.run([*ray, "start", "--head", "--port", str(port), "--num-gpus", "1",
                              "--temp-dir", short_folder(), "--disable-usage-stats"],
                             env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        text = run_until_known([*shlex.split(ENGINE), MODEL, "--port", str(free_port()), "--max-model-len", "2048",
                               "--enforce-eager", "--tensor-parallel-size", "2",
                               "--distributed-executor-backend", "ray"],
                              {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}, tmp_path / "vllm.log", 150)
    finally:
        subprocess.run([*ray, "stop", "--force"], env=env, capture_output=True, timeout=120)
    lines = keep("ray-placement", text, tmp_path)
    hit = find_known(lines)
    assert hit is not None and hit[0].key == "ray-placement", lines[-8:]
