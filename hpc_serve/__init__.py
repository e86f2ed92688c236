"""hpc-serve: serve LLMs with vLLM on Slurm clusters, across nodes, with one command."""

from __future__ import annotations

from typing import Any

__all__ = ["HpcServeError", "deployment", "plan", "render", "resolve", "submit", "__version__"]

from .errors import HpcServeError
from .version import __version__


def __getattr__(name: str) -> Any:
    # The API is imported on first use, so `import hpc_serve` (and the node agent) stays light.
    if name in ("deployment", "plan", "render", "resolve", "submit"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'hpc_serve' has no attribute {name!r}")
