"""Streaming chat through `hpc-serve tunnel` vs straight to the endpoint (needs root).

Usage: python benchmarks/tunnel.py [--rounds 9] [--clients 16] [--requests 8]

One real single-node deployment (vLLM CPU build, the tiny model) on the local Slurm cluster, a real
sshd on loopback (tests/sshd.py), and a background tunnel through it. Each round runs the same
load straight to the node and through the tunnel, alternating which goes first: `--clients`
concurrent clients, each sending `--requests` streaming chat requests. Per round: throughput
(completed requests per second) and the median time to first token. Reported: medians over
rounds of the tunnel/direct throughput ratio (target >= 0.95) and of the added TTFT (<= 5 ms).
`--pin` puts vLLM on CPU 1 and everything else (the load generator, ssh, sshd) on CPU 0, as when
client, login host and node are different machines; by default all share both CPUs. Writes
benchmarks/results/tunnel.{json,md} (`--pin`: tunnel-pinned.{json,md}).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import run_folder, write_results  # noqa: E402
from hpc_serve.demo import localcluster  # noqa: E402
from hpc_serve.demo.vllm_env import ensure_vllm_env  # noqa: E402
from tests.sshd import Sshd, ensure_installed  # noqa: E402

CLI = [sys.executable, "-m", "hpc_serve"]


async def one_stream(url: str, key: str, model: str) -> float:
    """Send one streaming chat request; return the seconds to its first token.

    Plain HTTP/1.1 on asyncio streams: the load generator must cost far less CPU than what it
    measures (16 urllib threads took a visible share of this 2-core machine)."""
    hostport, _, prefix = url.removeprefix("http://").partition("/")
    host, port = hostport.split(":")
    body = json.dumps({"model": model, "stream": True, "max_tokens": 16,
                       "messages": [{"role": "user", "content": "Tell me about clusters."}]}).encode()
    head = (f"POST /{prefix}/chat/completions HTTP/1.1\r\nHost: {hostport}\r\n"
            f"Content-Type: application/json\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head.encode() + body)
    first = None
    while True:
        line = await reader.readline()
        if not line:
            break
        if first is None and line.startswith(b"data:") and b'"content"' in line:
            first = time.perf_counter() - start
        if line.strip() == b"data: [DONE]":
            break
    writer.close()
    return first if first is not None else time.perf_counter() - start


def load(url: str, key: str, model: str, clients: int, requests: int) -> tuple[float, float]:
    """(requests per second, median TTFT) with ``clients`` concurrent streaming clients."""
    async def client() -> list[float]:
        return [await one_stream(url, key, model) for _ in range(requests)]

    async def everyone() -> list[float]:
        done = await asyncio.gather(*(client() for _ in range(clients)))
        return [ttft for ttfts in done for ttft in ttfts]

    start = time.perf_counter()
    ttfts = asyncio.run(everyone())
    return len(ttfts) / (time.perf_counter() - start), statistics.median(ttfts)


def alternating_rounds(count: int, paths: dict[str, str], key: str, model: str, clients: int,
                       requests: int) -> list[dict[str, tuple[float, float]]]:
    """``count`` rounds of ``load`` on each path (name -> URL), in their order in even rounds and
    in the reverse order in odd ones; each round's (requests/s, median TTFT) per path."""
    rounds = []
    for index in range(count):
        order = list(paths.items())
        measured = {}
        for name, url in order if index % 2 == 0 else order[::-1]:
            measured[name] = load(url, key, model, clients, requests)
        rounds.append(measured)
        print(f"round {index + 1}: " + "; ".join(f"{name} {rate:.2f} req/s ttft {ttft * 1000:.1f} ms"
                                                for name, (rate, ttft) in measured.items()), flush=True)
    return rounds


def medians(rounds: list[dict], baseline: str, other: str) -> tuple[float, float, float, float]:
    """Medians over rounds: (other/baseline throughput ratio, added TTFT in ms, baseline req/s, other req/s)."""
    return (statistics.median(r[other][0] / r[baseline][0] for r in rounds),
            statistics.median((r[other][1] - r[baseline][1]) * 1000 for r in rounds),
            statistics.median(r[baseline][0] for r in rounds), statistics.median(r[other][0] for r in rounds))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--ssh-options", default="", help="extra ssh options, e.g. '-c aes128-gcm@openssh.com'")
    parser.add_argument("--pin", action="store_true", help="vLLM on CPU 1; load generator, ssh and sshd on CPU 0")
    args = parser.parse_args()
    engine_env: list[str] = []
    if args.pin:
        os.sched_setaffinity(0, {0})  # inherited by sshd, the tunnel and its ssh
        engine_env = ["--env", "VLLM_CPU_OMP_THREADS_BIND=1"]
    vllm = ensure_vllm_env(print)
    ensure_installed()
    cluster = localcluster.up(nodes=1)
    sshd = Sshd(Path(tempfile.mkdtemp(prefix="bench-sshd-"))).start()
    rounds = []
    try:
        home = run_folder(cluster, "tunnel") / "home"
        env = {**os.environ, **cluster.env, "HPC_SERVE_HOME": str(home), "HPC_SERVE_PYTHON": sys.executable,
               "HPC_SERVE_SSH_CMD": f"{sshd.ssh_cmd} {args.ssh_options}".strip()}
        engine_cmd = f"taskset -c 1 {vllm.engine_cmd}" if args.pin else vllm.engine_cmd
        done = subprocess.run([*CLI, "submit", vllm.model, "--gpus-per-node", "1", "--engine-cmd", engine_cmd,
                               *engine_env, "--env", "VLLM_CPU_KVCACHE_SPACE=1", "--timeout", "300", "--",
                               "--max-model-len", "512", "--enforce-eager"], env=env, capture_output=True,
                              text=True, check=True)
        job = done.stdout.split()[1]
        endpoint = json.loads(subprocess.run([*CLI, "endpoint", job, "--json"], env=env, capture_output=True,
                                             text=True, check=True).stdout)
        key = Path(endpoint["api_key_file"]).read_text()
        tunnel = subprocess.run([*CLI, "tunnel", job, "--via", "login", "--background"], env=env,
                                capture_output=True, text=True, check=True)
        tunnel_url = tunnel.stdout.split()[4]
        model = endpoint["served_model"]
        load(endpoint["url"], key, model, args.clients, 1)  # warm-up, both paths
        load(tunnel_url, key, model, args.clients, 1)
        rounds = alternating_rounds(args.rounds, {"direct": endpoint["url"], "tunnel": tunnel_url}, key, model,
                                    args.clients, args.requests)
        subprocess.run([*CLI, "tunnel", job, "--close"], env=env, capture_output=True)
        subprocess.run([*CLI, "cancel", job], env=env, capture_output=True)
    finally:
        sshd.stop()
        localcluster.down()
    ratio, added, direct, through = medians(rounds, "direct", "tunnel")
    text = "\n".join([
        f"Median of {args.rounds} alternating rounds; each round {args.clients} concurrent clients x "
        f"{args.requests} streaming chat requests (16 tokens) per path; `python benchmarks/tunnel.py"
        + (f" --ssh-options '{args.ssh_options}'" if args.ssh_options else "") + (" --pin" if args.pin else "")
        + "`.", "",
        "| path | throughput (req/s) | ratio | target |", "|---|---|---|---|",
        f"| straight to the node (baseline) | {direct:.2f} | 1.00 | |",
        f"| through `hpc-serve tunnel` (ssh -L via sshd on loopback) | {through:.2f} | {ratio:.2f} | >= 0.95 |", "",
        f"Added median time to first token through the tunnel: {added:+.1f} ms (target <= 5 ms).", ""])
    write_results("tunnel-pinned" if args.pin else "tunnel", text, {"args": vars(args), "rounds": rounds})
    return 0 if ratio >= 0.95 and added <= 5 else 1


if __name__ == "__main__":
    sys.exit(main())
