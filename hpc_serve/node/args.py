"""The node agent's command line: written by the templates, parsed by `python -m hpc_serve.node`.

Stdlib only: this runs inside the allocation, where the CLI's dependencies may be missing.
"""

from __future__ import annotations

import argparse
import shlex
from typing import Any

from ..planner.spec import DeploymentSpec


def to_node_args(spec: DeploymentSpec) -> list[str]:
    """Everything the node side needs of the spec (the model comes separately, as $MODEL)."""
    lay = spec.layout
    args = ["--nodes", str(lay.nodes), "--gpus-per-node", str(lay.gpus_per_node),
            "--tp", str(lay.tp), "--pp", str(lay.pp), "--dp", str(lay.dp),
            "--launcher", lay.launcher]
    args += ["--ep"] * lay.ep + ["--cross-node-tp"] * lay.cross_node_tp
    if lay.ep:
        args += ["--all2all-backend", spec.all2all_backend]
    if spec.engine_cmd != "vllm serve":
        args += ["--engine-cmd", spec.engine_cmd]
    if spec.ray_cmd != "ray" and lay.launcher == "ray":
        args += ["--ray-cmd", spec.ray_cmd]
    if spec.port is not None:
        args += ["--port", str(spec.port)]
    if spec.network is not None:
        args += ["--network", spec.network]
    if spec.cache_dir is not None:
        args += ["--cache-dir", spec.cache_dir]
    if not spec.api_key:
        args += ["--no-api-key"]
    if spec.open_metrics:
        args += ["--open-metrics"]
    if spec.max_restarts:
        args += ["--max-restarts", str(spec.max_restarts)]
    if spec.auto_renew:
        args += ["--auto-renew", "--renew-before", str(spec.renew_before), "--time", str(spec.time)]
    if spec.vllm_args:
        args += ["--", *spec.vllm_args]
    return args


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hpc_serve.node",
                                description="hpc-serve node agent: runs once per node of a job.")
    p.add_argument("--model", required=True)
    for name in ("--nodes", "--gpus-per-node", "--tp", "--pp", "--dp", "--port"):
        p.add_argument(name, type=int)
    p.add_argument("--launcher", default="auto")
    p.add_argument("--ep", action="store_true")
    p.add_argument("--cross-node-tp", action="store_true")
    p.add_argument("--all2all-backend", default="allgather_reducescatter")
    p.add_argument("--engine-cmd", default="vllm serve")
    p.add_argument("--ray-cmd", default="ray")
    p.add_argument("--no-api-key", dest="api_key", action="store_false")
    p.add_argument("--open-metrics", action="store_true")
    p.add_argument("--max-restarts", type=int, default=0)
    p.add_argument("--auto-renew", action="store_true")
    p.add_argument("--renew-before", type=int, default=30)
    p.add_argument("--time")
    p.add_argument("--network")
    p.add_argument("--cache-dir")
    p.add_argument("vllm_args", nargs="*")
    return p


def parse_node_args(argv: list[str]) -> dict[str, Any]:
    """Keyword arguments for build_spec from the node agent's argv."""
    ns = parser().parse_args(argv)
    values = vars(ns)
    values["vllm_args"] = tuple(values["vllm_args"])
    return values


def node_spec(argv: list[str], home: str | None = None) -> DeploymentSpec:
    """The deployment spec a node agent runs, from its argv (validated like the login side's)."""
    from ..planner.spec import build_spec

    values = parse_node_args(argv)
    return build_spec(**{**values, "executor": "local", **({"home": home} if home else {})})


def node_command(spec: DeploymentSpec) -> str:
    """The shell words after `python -m hpc_serve.node --model "$MODEL"`, quoted."""
    return " ".join(shlex.quote(arg) for arg in to_node_args(spec))
