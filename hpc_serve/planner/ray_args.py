"""The `ray start` command lines of a Ray launcher deployment, with every port Ray binds set.

Ray's defaults are fixed ports (GCS 6379, client 10001, dashboard agent 52365, autoscaler metrics
44217) or random ones, and workers 10002-19999: two deployments on a node, or any other user's Ray,
would collide. Every port here comes from the job (ports.py); the node agent checks the fixed ones
by binding before it starts Ray (launch.node_ports).
"""

from __future__ import annotations

from .vllm_args import Runtime, _words


def ray_argv(rank: int, gpus: int, rt: Runtime, ray_cmd: str = "ray") -> list[str]:
    """`ray start --block` for the head (rank 0) or a worker, pinned to this node's IP and ports."""
    common = ["--block", "--node-ip-address", rt.node_ip, "--num-gpus", str(gpus),
              "--node-manager-port", rt.ray_node_manager_port,
              "--object-manager-port", rt.ray_object_manager_port,
              "--metrics-export-port", rt.ray_metrics_export_port,
              "--dashboard-agent-grpc-port", rt.ray_dashboard_agent_grpc_port,
              "--dashboard-agent-listen-port", rt.ray_dashboard_agent_http_port,
              "--runtime-env-agent-port", rt.ray_runtime_env_agent_port,
              "--min-worker-port", rt.ray_min_worker_port, "--max-worker-port", rt.ray_max_worker_port,
              "--temp-dir", f"{rt.tmp_dir}/ray", "--disable-usage-stats"]
    start = [*_words(ray_cmd), "start"]
    if rank == 0:
        return [*start, "--head", "--port", rt.ray_port,
                "--ray-client-server-port", rt.ray_client_port, "--include-dashboard=false", *common]
    return [*start, "--address", f"{rt.head_ip}:{rt.ray_port}", *common]


def ray_start_env(rank: int, rt: Runtime) -> tuple[tuple[str, str], ...]:
    """Environment of `ray start`: the head's two metrics servers that have no flag, and no
    prestarted workers (Ray would start one per CPU when vLLM connects, each taking a worker port:
    vLLM's actors start on demand instead, so the job's worker range is enough)."""
    env = (("RAY_prestart_worker_first_driver", "0"),)
    if rank == 0:
        env += (("AUTOSCALER_METRIC_PORT", rt.ray_autoscaler_metrics_port),
                ("DASHBOARD_METRIC_PORT", rt.ray_dashboard_metrics_port))
    return env
