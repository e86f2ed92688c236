"""The GPU tier: hpc-serve on a real NVIDIA GPU through `--executor local` (docs/development.md).

Needs a CUDA GPU, vLLM and Ray importable by this Python (or HPC_SERVE_GPU_ENGINE_CMD and
HPC_SERVE_GPU_RAY_CMD), and HPC_SERVE_GPU_MODEL (a model folder; benchmarks/gpu_model.py makes
one). Skipped elsewhere, saying why: CI and the CPU machines have no GPU.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpc_serve.node.engine import marked_processes

from ..cluster.helpers import read_state, run_cli, wait_for

pytestmark = pytest.mark.gpu
ENGINE = os.environ.get("HPC_SERVE_GPU_ENGINE_CMD", f"{sys.executable} -m vllm.entrypoints.cli.main serve")
RAY = os.environ.get("HPC_SERVE_GPU_RAY_CMD", f"{sys.executable} -m ray.scripts.scripts")
FLAGS = ["--", "--max-model-len", "2048", "--gpu-memory-utilization", "0.5"]
CACHE_HIT = "Directly load the compiled graph"
MODEL = os.environ.get("HPC_SERVE_GPU_MODEL")  # read now: the tests' own fixtures clear HPC_SERVE_*


def _why_not() -> str | None:
    if shutil.which("nvidia-smi") is None or not os.path.isdir("/proc/driver/nvidia/gpus"):
        return "no NVIDIA GPU on this machine (the GPU tier runs on the GPU machine)"
    if not MODEL:
        return "HPC_SERVE_GPU_MODEL is not set (make one with benchmarks/gpu_model.py DIR)"
    return None


if _why_not():
    pytest.skip(_why_not(), allow_module_level=True)


def gpu_memory_used_mib() -> int:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return sum(int(line) for line in out.split())


@pytest.fixture
def gpu_home(tmp_path, monkeypatch):
    home = tmp_path / "registry"
    monkeypatch.setenv("HPC_SERVE_HOME", str(home))
    monkeypatch.setenv("HPC_SERVE_PYTHON", sys.executable)
    idle = gpu_memory_used_mib()
    yield home
    run_cli("cancel", "--all")
    wait_for(lambda: gpu_memory_used_mib() <= idle + 64, 60, "the GPU memory to be freed")


def serve(home: Path, launcher: str, cache: Path) -> tuple[str, float]:
    """Submit, wait until READY; (job id, seconds from submit to READY)."""
    asked = time.time()
    done = run_cli("submit", MODEL, "--executor", "local", "--gpus-per-node", "1",
                   "--launcher", launcher, "--engine-cmd", ENGINE, "--ray-cmd", RAY, "--cache-dir", str(cache),
                   "--timeout", "600", *FLAGS, timeout=660)
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.split()[1]
    ready = next(h["at"] for h in read_state(home, job_id)["history"] if h["phase"] == "READY")
    return job_id, ready - asked


def check_the_openai_api(home: Path, job_id: str) -> None:
    from hpc_serve.client.handle import DeploymentHandle

    client = DeploymentHandle(str(home), job_id).openai_client(max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    done = client.completions.create(model=model, prompt="The GPU", max_tokens=8)
    assert done.choices[0].finish_reason in ("length", "stop")
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
    assert chat.choices[0].finish_reason in ("length", "stop")
    chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=8, stream=True))
    assert len(chunks) >= 2 and chunks[-1].choices[0].finish_reason in ("length", "stop")
    smoke = run_cli("smoke", job_id, timeout=300)
    assert smoke.returncode == 0, smoke.stdout + smoke.stderr


def cancel_and_check_gone(home: Path, job_id: str, idle_mib: int) -> None:
    assert run_cli("cancel", job_id).returncode == 0
    assert read_state(home, job_id)["phase"] == "STOPPED"
    wait_for(lambda: not marked_processes(f"{job_id}/"), 30, "no process of the deployment left")
    wait_for(lambda: gpu_memory_used_mib() <= idle_mib + 64, 60,
             f"the GPU memory to be freed ({gpu_memory_used_mib()} MiB in use, {idle_mib} before)")


def test_mp_serves_then_starts_again_from_the_compile_cache(gpu_home, tmp_path):
    idle = gpu_memory_used_mib()
    cache = tmp_path / "cache"
    first, cold_s = serve(gpu_home, "mp", cache)
    check_the_openai_api(gpu_home, first)
    cancel_and_check_gone(gpu_home, first, idle)
    second, warm_s = serve(gpu_home, "mp", cache)
    log = (gpu_home / "deployments" / second / "logs" / "node-0.log").read_text()
    assert CACHE_HIT in log, "the second start did not load vLLM's compiled graphs from the cache"
    assert CACHE_HIT not in (gpu_home / "deployments" / first / "logs" / "node-0.log").read_text()
    print(json.dumps({"mp_ready_cold_s": round(cold_s, 1), "mp_ready_warm_s": round(warm_s, 1)}))
    assert warm_s < cold_s, (cold_s, warm_s)
    cancel_and_check_gone(gpu_home, second, idle)


def test_the_ray_launcher_serves_on_the_gpu(gpu_home, tmp_path):
    idle = gpu_memory_used_mib()
    job_id, ready_s = serve(gpu_home, "ray", tmp_path / "cache")
    print(json.dumps({"ray_ready_cold_s": round(ready_s, 1)}))
    record = json.loads((gpu_home / "deployments" / job_id / "nodes" / "0.json").read_text())
    assert record["cuda_visible_devices"] not in (None, ""), record
    check_the_openai_api(gpu_home, job_id)
    cancel_and_check_gone(gpu_home, job_id, idle)
