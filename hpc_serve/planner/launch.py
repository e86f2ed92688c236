"""LaunchPlan: what every node of a deployment runs. Pure: no I/O, no Slurm."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .ray_args import ray_argv, ray_start_env
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
    """One node's role, GPUs, PP stages, DP ranks, processes, and the fixed ports they bind."""

    rank: int
    role: str
    gpus: tuple[int, ...]
    stages: tuple[int, ...]
    dp_ranks: tuple[int, ...]
    processes: tuple[Process, ...]
    ports: tuple[str, ...] = ()


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


def node_ports(spec: DeploymentSpec, rank: int, rt: Runtime = Runtime()) -> tuple[str, ...]:
    """The fixed ports the processes of node ``rank`` bind, which the node agent checks first.

    Exactly what vLLM 0.32 and Ray 2.60 bind for this plan: the API port on node 0; the master port
    where ``--nnodes`` is passed (torch's store, on node 0); the DP RPC port for mp DP across nodes
    (node 0's handshake; single-node DP uses IPC, Ray DP ports vLLM picks); every Ray port given
    to `ray start`. Not listed: Ray's worker range (Ray skips the busy ports of it) and the ports
    vLLM and Ray pick at random in the ephemeral range.
    """
    lay = spec.layout
    ports: list[str] = []
    if rank == 0:
        ports.append(rt.api_port)
        if lay.launcher == "mp" and lay.nodes > 1 and (lay.dp == 1 or lay.spans_nodes):
            ports.append(rt.master_port)
        if lay.launcher == "mp" and lay.nodes > 1 and lay.dp > 1:
            ports.append(rt.dp_rpc_port)
    if lay.launcher == "ray":
        if rank == 0:
            ports += [rt.ray_port, rt.ray_client_port, rt.ray_autoscaler_metrics_port,
                      rt.ray_dashboard_metrics_port]
        ports += [rt.ray_node_manager_port, rt.ray_object_manager_port, rt.ray_metrics_export_port,
                  rt.ray_dashboard_agent_grpc_port, rt.ray_dashboard_agent_http_port,
                  rt.ray_runtime_env_agent_port]
    return tuple(ports)


def node_plan(spec: DeploymentSpec, rank: int, rt: Runtime = Runtime()) -> NodePlan:
    """The plan of node ``rank`` alone (what the node agent asks for)."""
    slots = spec.layout.node_slots(rank)
    return NodePlan(rank, _role(spec, rank), slots.gpus, slots.stages, slots.dp_ranks,
                    _processes(spec, rank, rt), node_ports(spec, rank, rt))


def _processes(spec: DeploymentSpec, rank: int, rt: Runtime) -> tuple[Process, ...]:
    lay = spec.layout
    host_env = (("VLLM_HOST_IP", rt.node_ip),)
    processes: list[Process] = []
    if lay.launcher == "ray":
        processes.append(Process("ray", tuple(ray_argv(rank, lay.gpus_per_node, rt, spec.ray_cmd)),
                                 host_env + ray_start_env(rank, rt)))
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
    worker_ports = node_ports(spec, 1, rt) if worker is not None else ()
    nodes = []
    for rank in range(lay.nodes):
        slots = lay.node_slots(rank)
        if worker is not None and rank > 0:
            processes, ports = worker, worker_ports
        else:
            processes, ports = _processes(spec, rank, rt), node_ports(spec, rank, rt)
        nodes.append(NodePlan(rank, _role(spec, rank), slots.gpus, slots.stages, slots.dp_ranks,
                              processes, ports))
    return LaunchPlan(spec, served_model_name(spec.model, spec.vllm_args), tuple(nodes))
