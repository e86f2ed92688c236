"""The built wheel carries the templates: install it into a fresh venv and render from it."""

import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_installs_and_renders_away_from_the_repository(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(ROOT)],
                   check=True, capture_output=True)
    wheel = next(dist.glob("hpc_serve-*.whl"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", str(wheel)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run([str(env_dir / "bin" / "hpc-serve"), "render", "org/m", "--nodes", "2",
                           "--tp", "8", "--pp", "2"], capture_output=True, text=True, cwd=elsewhere,
                          env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert "#SBATCH --nodes=2" in done.stdout
    where = subprocess.run([str(python), "-c", "from hpc_serve.job.sbatch import templates_dir; print(templates_dir())"],
                           capture_output=True, text=True, cwd=elsewhere, check=True).stdout
    assert "site-packages/hpc_serve/templates" in where
