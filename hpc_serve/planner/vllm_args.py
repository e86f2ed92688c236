"""The vLLM command line, built in one place from the layout, and checks on pass-through args.

Which node gets what (docs/concepts.md has the table): the flags hpc-serve manages are set per
node from the layout; a pass-through option goes to every node that runs vLLM, except API-server
options (vLLM's Frontend group and the serve-level options), which only the API node (node 0) gets.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from functools import lru_cache

from ..errors import HpcServeError
from .layout import Layout
from .ports import Ports
from ..vllm_auth import MIDDLEWARE as AUTH_MIDDLEWARE
from .vllm_parser import ALL2ALL_CHOICES, ALL2ALL_REMOVED, MANAGED, REFUSED, Arg, read_args


@dataclass(frozen=True)
class Runtime:
    """Where a node runs: addresses, ports and temp dir. Placeholders when planning ahead."""

    node_ip: str = "<node-ip>"
    head_ip: str = "<head-ip>"
    api_port: str = "<api-port>"
    ray_port: str = "<ray-port>"
    master_port: str = "<master-port>"
    dp_rpc_port: str = "<dp-rpc-port>"
    ray_client_port: str = "<ray-client-port>"
    tmp_dir: str = "<job-tmp>"
    ray_node_manager_port: str = "<ray-node-manager-port>"
    ray_object_manager_port: str = "<ray-object-manager-port>"
    ray_metrics_export_port: str = "<ray-metrics-export-port>"
    ray_dashboard_agent_grpc_port: str = "<ray-dashboard-agent-grpc-port>"
    ray_dashboard_agent_http_port: str = "<ray-dashboard-agent-http-port>"
    ray_runtime_env_agent_port: str = "<ray-runtime-env-agent-port>"
    ray_autoscaler_metrics_port: str = "<ray-autoscaler-metrics-port>"
    ray_dashboard_metrics_port: str = "<ray-dashboard-metrics-port>"
    ray_min_worker_port: str = "<ray-min-worker-port>"
    ray_max_worker_port: str = "<ray-max-worker-port>"
    preflight_port: str = "<preflight-port>"

    @classmethod
    def for_job(cls, ports: Ports, node_ip: str, head_ip: str, tmp_dir: str) -> Runtime:
        """The real runtime of a node: its addresses and every port of ``ports``."""
        return cls(node_ip=node_ip, head_ip=head_ip, api_port=str(ports.api), ray_port=str(ports.ray),
                   master_port=str(ports.master), dp_rpc_port=str(ports.dp_rpc),
                   ray_client_port=str(ports.ray_client), tmp_dir=tmp_dir,
                   ray_node_manager_port=str(ports.ray_node_manager),
                   ray_object_manager_port=str(ports.ray_object_manager),
                   ray_metrics_export_port=str(ports.ray_metrics_export),
                   ray_dashboard_agent_grpc_port=str(ports.ray_dashboard_agent_grpc),
                   ray_dashboard_agent_http_port=str(ports.ray_dashboard_agent_http),
                   ray_runtime_env_agent_port=str(ports.ray_runtime_env_agent),
                   ray_autoscaler_metrics_port=str(ports.ray_autoscaler_metrics),
                   ray_dashboard_metrics_port=str(ports.ray_dashboard_metrics),
                   ray_min_worker_port=str(ports.ray_min_worker),
                   ray_max_worker_port=str(ports.ray_max_worker), preflight_port=str(ports.preflight))


@lru_cache(maxsize=8)
def _words(command: str) -> tuple[str, ...]:
    return tuple(shlex.split(command))


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _agrees(arg: Arg, layout: Layout) -> bool:
    """Whether a managed pass-through option only repeats the layout (then it is dropped)."""
    sizes = {"tensor_parallel_size": layout.tp, "pipeline_parallel_size": layout.pp,
             "data_parallel_size": layout.dp, "prefill_context_parallel_size": 1}
    assert arg.option is not None
    if arg.dest in sizes:
        return _int(arg.value) == sizes[arg.dest]
    if arg.dest == "enable_expert_parallel":
        return arg.option.negative != layout.ep
    if arg.dest in ("data_parallel_hybrid_lb", "data_parallel_external_lb"):
        return arg.option.negative  # hpc-serve never turns them on
    return False


def check_passthrough(args: tuple[str, ...], layout: Layout) -> tuple[str, ...]:
    """Refuse pass-through flags that contradict the layout or leak a secret; return warnings.

    Every way vLLM's parser accepts an option counts: aliases, ``_`` for ``-``, negations and
    unique prefixes (``--tensor-parallel 4`` is ``--tensor-parallel-size 4``).
    """
    warnings: list[str] = []
    parsed = read_args(args)
    for arg in parsed:
        if arg.ambiguous:
            raise HpcServeError(
                f"{arg.words[0]} in the vLLM arguments abbreviates several vLLM options "
                f"({', '.join(arg.ambiguous[:4])}{', ...' if len(arg.ambiguous) > 4 else ''}): "
                "vLLM refuses it.",
                "Spell the option out in full.",
            )
        if arg.dest in REFUSED:
            problem, hint = REFUSED[arg.dest]
            raise HpcServeError(problem.format(shown=arg.shown), hint)
        if arg.dest == "api_server_count" and (_int(arg.value) or 0) < 1:
            raise HpcServeError(
                f"{arg.shown} in the vLLM arguments: node 0 would run no API server (it would be "
                "headless), so the endpoint would never answer.",
                "Give a count of 1 or more (API server processes on node 0), or leave it out.",
            )
        if arg.kind != "managed" or _agrees(arg, layout):
            continue
        owner = MANAGED[arg.dest]
        raise HpcServeError(
            f"{arg.shown} in the vLLM arguments contradicts the layout hpc-serve manages.",
            f"Set it with {owner} instead (now tp={layout.tp}, pp={layout.pp}, dp={layout.dp})."
            if owner.startswith("--") else f"Remove it: {owner} sets it instead.",
        )
    given = {arg.dest: arg for arg in parsed if arg.dest}
    eplb = given.get("enable_eplb")
    if eplb is not None and not eplb.option.negative and not layout.ep:
        raise HpcServeError("--enable-eplb needs expert parallelism; vLLM rejects it without.",
                            "Add --ep (for an MoE model), or drop --enable-eplb.")
    if "all2all_backend" in given:
        check_all2all_backend(given["all2all_backend"].value or "")
        if not layout.ep:
            warnings.append("--all2all-backend has no effect without --ep.")
    return tuple(warnings)


def check_all2all_backend(value: str) -> None:
    """Refuse an --all2all-backend that vLLM would refuse or silently replace (vLLM 0.32's
    choices, config/parallel.py; "passthrough" is not on its command line)."""
    if value in ALL2ALL_REMOVED:
        raise HpcServeError(
            f"--all2all-backend {value} was removed from vLLM, which silently runs "
            "allgather_reducescatter instead.",
            "Use --all2all-backend allgather_reducescatter (the default), or e.g. "
            "deepep_high_throughput / deepep_low_latency on GPUs with DeepEP.",
        )
    if value not in ALL2ALL_CHOICES:
        choices = ", ".join(c for c in ALL2ALL_CHOICES if c not in ALL2ALL_REMOVED)
        raise HpcServeError(f"--all2all-backend {value!r} is not one of vLLM's choices.",
                            f"Use one of: {choices}.")


def served_model_name(model: str, args: tuple[str, ...]) -> str:
    """The name /v1/models will list: the first --served-model-name, else the model."""
    for arg in read_args(args):
        if arg.dest == "served_model_name" and arg.value:
            return arg.value
    return model


def passthrough_for(args: tuple[str, ...], api_node: bool) -> list[str]:
    """The pass-through words one node gets: managed options dropped (check_passthrough let only
    agreeing ones through), API-server options only on the API node."""
    out: list[str] = []
    for arg in read_args(args):
        if arg.kind == "managed" or (arg.kind == "api" and not api_node):
            continue
        out += arg.words
    return out


def engine_argv(spec, rank: int, rt: Runtime) -> list[str] | None:  # spec: DeploymentSpec
    """The vLLM argv node ``rank`` runs, or None when that node runs no vLLM (Ray workers)."""
    lay: Layout = spec.layout
    if lay.launcher == "ray" and rank > 0:
        return None
    argv = list(_words(spec.engine_cmd))
    argv += [spec.model] if argv[-1] == "serve" else ["--model", spec.model]
    headless = lay.launcher == "mp" and rank > 0
    if not headless:
        argv += ["--host", rt.node_ip, "--port", rt.api_port]
        if spec.api_key:  # the key on every path, not only /v1 (hpc_serve/vllm_auth.py)
            argv += ["--middleware", AUTH_MIDDLEWARE]
    argv += ["--tensor-parallel-size", str(lay.tp), "--pipeline-parallel-size", str(lay.pp)]
    distributed = lay.tp * lay.pp > 1
    if lay.launcher == "ray":
        argv += ["--distributed-executor-backend", "ray"]
        if lay.dp > 1:  # the DP RPC port is mp's: Ray DP engines talk over ports vLLM picks
            argv += ["--data-parallel-size", str(lay.dp), "--data-parallel-backend", "ray",
                     "--data-parallel-size-local", str(lay.dp_local),
                     "--data-parallel-address", rt.head_ip]
    else:
        if distributed:
            argv += ["--distributed-executor-backend", "mp"]
        if lay.dp > 1:
            argv += ["--data-parallel-size", str(lay.dp), "--data-parallel-backend", "mp",
                     "--data-parallel-size-local", str(lay.dp_local)]
            if lay.nodes > 1:
                argv += ["--data-parallel-address", rt.head_ip,
                         "--data-parallel-rpc-port", rt.dp_rpc_port]
            if lay.spans_nodes:  # each replica spans nodes: vLLM splits --nnodes into replicas itself
                argv += _nnodes(lay, rank, rt)
            elif headless:
                argv += ["--data-parallel-start-rank", str(rank * lay.dp_local)]
        elif lay.nodes > 1:
            argv += _nnodes(lay, rank, rt)
        if headless:
            argv += ["--headless"]
    user = spec.vllm_args
    if lay.ep:
        argv += ["--enable-expert-parallel"]
        if not any(arg.dest == "all2all_backend" for arg in read_args(user)):
            argv += ["--all2all-backend", spec.all2all_backend]
    argv += passthrough_for(user, api_node=not headless)
    return argv


def _nnodes(lay: Layout, rank: int, rt: Runtime) -> list[str]:
    return ["--nnodes", str(lay.nodes), "--node-rank", str(rank),
            "--master-addr", rt.head_ip, "--master-port", rt.master_port]
