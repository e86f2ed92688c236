"""LaunchPlan: what every node of a deployment runs. Pure: no I/O, no Slurm."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .ray_args import ray_argv
from .spec import DeploymentSpec
from .vllm_args import Runtime, engine_argv, served_model_name


@dataclass(frozen=True)
class Process:
    """One process a node agent starts: a name, its exact argv and extra environment."""

    name: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class NodePlan:
    """One node's role, GPUs, PP stages, DP ranks and processes."""

    rank: int
    role: str
    gpus: tuple[int, ...]
    stages: tuple[int, ...]
    dp_ranks: tuple[int, ...]
    processes: tuple[Process, ...]


@dataclass(frozen=True)
class LaunchPlan:
    """The whole deployment: spec, served model name and one NodePlan per node."""

    spec: DeploymentSpec
    served_model: str
    nodes: tuple[NodePlan, ...]

    def to_dict(self) -> dict:
        return {"spec": self.spec.to_dict(), "served_model": self.served_model,
                "nodes": [asdict(node) for node in self.nodes]}


def _role(spec: DeploymentSpec, rank: int) -> str:
    lay = spec.layout
    if lay.launcher == "ray":
        return "ray head + vllm api" if rank == 0 else "ray worker"
    if lay.nodes == 1:
        return "vllm api"
    return "vllm api (rank 0)" if rank == 0 else f"vllm headless (rank {rank})"


def node_plan(spec: DeploymentSpec, rank: int, rt: Runtime = Runtime()) -> NodePlan:
    """The plan of node ``rank`` alone (what the node agent asks for)."""
    slots = spec.layout.node_slots(rank)
    return NodePlan(rank, _role(spec, rank), slots.gpus, slots.stages, slots.dp_ranks,
                    _processes(spec, rank, rt))


def _processes(spec: DeploymentSpec, rank: int, rt: Runtime) -> tuple[Process, ...]:
    lay = spec.layout
    host_env = (("VLLM_HOST_IP", rt.node_ip),)
    processes: list[Process] = []
    if lay.launcher == "ray":
        processes.append(Process("ray", tuple(ray_argv(rank, lay.gpus_per_node, rt, spec.ray_cmd)),
                                 host_env))
    argv = engine_argv(spec, rank, rt)
    if argv is not None:
        env = host_env + spec.env
        if lay.launcher == "ray":
            env += (("RAY_ADDRESS", f"{rt.head_ip}:{rt.ray_port}"),)
            if lay.dp > 1 and lay.replica_gpus > lay.gpus_per_node:
                env += (("VLLM_RAY_DP_PACK_STRATEGY", "span"),)
        processes.append(Process("vllm", tuple(argv), env))
    return tuple(processes)


def make_plan(spec: DeploymentSpec, rt: Runtime = Runtime()) -> LaunchPlan:
    """Every node's plan; with the default Runtime, addresses and ports are placeholders."""
    lay = spec.layout
    # Ray workers all run the same command: build it once (4096 nodes plan in well under 50 ms).
    worker = _processes(spec, 1, rt) if lay.launcher == "ray" and lay.nodes > 1 else None
    nodes = []
    for rank in range(lay.nodes):
        slots = lay.node_slots(rank)
        processes = worker if worker is not None and rank > 0 else _processes(spec, rank, rt)
        nodes.append(NodePlan(rank, _role(spec, rank), slots.gpus, slots.stages, slots.dp_ranks,
                              processes))
    return LaunchPlan(spec, served_model_name(spec.model, spec.vllm_args), tuple(nodes))
