"""What an engine's environment holds beyond its plan: the per-user compile cache and the key;
and which Python a command runs.

The plan (hpc_serve.planner.launch) gives each process the environment that follows from the
layout; what follows from this user and this node at run time is added here: where vLLM's and
torch's compile caches live (kept between jobs), and the API key for the middleware that asks
for it on every path (never in argv). Stdlib only.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys

from ..planner.spec import DeploymentSpec


def cache_env(cache_dir: str | None, environ: dict[str, str]) -> dict[str, str]:
    """Where vLLM's compile cache and torch's inductor cache go: one folder per user, shared by
    deployments and kept between jobs, so that the next start of a model skips torch.compile.

    ``cache_dir`` (the ``cache_dir`` setting) wins; else the user's own ``VLLM_CACHE_ROOT``; else
    vLLM's default (``~/.cache/vllm``). ``TORCHINDUCTOR_CACHE_DIR`` follows it unless the user
    set one (torch's default lies under TMPDIR, which is per job)."""
    root = os.path.expanduser(cache_dir or environ.get("VLLM_CACHE_ROOT") or
                              os.path.join(environ.get("XDG_CACHE_HOME") or
                                           os.path.join(os.path.expanduser("~"), ".cache"), "vllm"))
    inductor = environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(root, "inductor")
    for folder in (root, inductor):
        os.makedirs(folder, mode=0o700, exist_ok=True)
    return {"VLLM_CACHE_ROOT": root, "TORCHINDUCTOR_CACHE_DIR": inductor}


def auth_env(spec: DeploymentSpec, api_key: str, tmp_dir: str) -> tuple[tuple[str, str], ...]:
    """The key for the middleware that asks for it on every path (hpc_serve.vllm_auth, copied
    where vLLM's own Python finds it). Not VLLM_API_KEY: vLLM 0.24 hashes that into its compile
    cache key and writes it into the cache folder."""
    from ..vllm_auth import KEY_ENV, OPEN_PATHS_ENV, install

    folder = install(os.path.join(tmp_dir, "py"))
    path = os.pathsep.join(p for p in (folder, dict(spec.env).get("PYTHONPATH") or os.environ.get("PYTHONPATH")) if p)
    return ((KEY_ENV, api_key), ("PYTHONPATH", path),
            (OPEN_PATHS_ENV, "/metrics" if spec.open_metrics else ""))


def command_python(command: str) -> str:
    """The interpreter behind a command (``ray``, ``vllm serve``, ``python -m ...``): the first
    word when it is a Python, else the #! line of the command's script, else this interpreter.
    Ray's probe and the preflight's all-reduce run with it, so they see what the command sees."""
    words = shlex.split(command)
    path = shutil.which(words[0]) if words else None
    if len(words) > 1 and "python" in os.path.basename(words[0]):
        return words[0]  # "python -m ray..." style commands
    try:
        with open(path or "", "rb") as handle:
            first = handle.readline().decode(errors="replace").strip()
    except OSError:
        return sys.executable
    if first.startswith("#!") and "python" in first:
        shebang = shlex.split(first[2:])
        return shebang[-1] if os.path.basename(shebang[0]) == "env" else shebang[0]
    return sys.executable
