"""The `ray start` command lines of a Ray launcher deployment."""

from __future__ import annotations

from .vllm_args import Runtime, _words


def ray_argv(rank: int, gpus: int, rt: Runtime, ray_cmd: str = "ray") -> list[str]:
    """`ray start --block` for the head (rank 0) or a worker, pinned to this node's IP."""
    common = ["--block", "--node-ip-address", rt.node_ip, "--num-gpus", str(gpus),
              "--temp-dir", f"{rt.tmp_dir}/ray", "--disable-usage-stats"]
    start = [*_words(ray_cmd), "start"]
    if rank == 0:
        return [*start, "--head", "--port", rt.ray_port,
                "--ray-client-server-port", rt.ray_client_port, "--include-dashboard=false", *common]
    return [*start, "--address", f"{rt.head_ip}:{rt.ray_port}", *common]
