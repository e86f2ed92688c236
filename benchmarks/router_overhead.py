"""Streaming chat through a group's router vs straight to its one replica (needs root).

Usage: python benchmarks/router_overhead.py [--rounds 9] [--clients 16] [--requests 8] [--pin]

One real group of one replica (vLLM CPU build, the tiny model, on the local Slurm cluster) behind
its router (`--replicas 1 --router local`: the key front and vllm-router on this machine). Each
round runs the same load straight to the replica and through the group's URL, alternating which
goes first: `--clients` concurrent clients, each sending `--requests` streaming chat requests
(the load generator of benchmarks/tunnel.py). Per round: throughput (completed requests per
second) and the median time to first token; vllm-router alone (on 127.0.0.1, without the key
front) is measured too, to tell the two hops apart. Reported: medians over rounds of the router/direct
throughput ratio (target >= 0.97) and of the added TTFT (target <= 3 ms). `--pin` puts vLLM on
CPU 1 and everything else (load generator, key front, vllm-router) on CPU 0, as when client,
router and replica are different machines; by default all share both CPUs. Writes
benchmarks/results/router_overhead.{json,md} (`--pin`: router_overhead-pinned.{json,md}).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import run_folder, write_results  # noqa: E402
from benchmarks.tunnel import alternating_rounds, load, medians  # noqa: E402
from hpc_serve.demo import localcluster  # noqa: E402
from hpc_serve.demo.vllm_env import ensure_vllm_env  # noqa: E402

CLI = [sys.executable, "-m", "hpc_serve"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--pin", action="store_true", help="vLLM on CPU 1; load, front and router on CPU 0")
    parser.add_argument("--policy", default="round_robin", help="vllm-router's policy (default: the group's default)")
    args = parser.parse_args()
    engine_env: list[str] = []
    if args.pin:
        os.sched_setaffinity(0, {0})  # inherited by the keeper, its front and vllm-router
        engine_env = ["--env", "VLLM_CPU_OMP_THREADS_BIND=1"]
    vllm = ensure_vllm_env(print)
    cluster = localcluster.up(nodes=1)
    rounds, cpu_ms = [], {}
    try:
        home = run_folder(cluster, "router") / "home"
        env = {**os.environ, **cluster.env, "HPC_SERVE_HOME": str(home), "HPC_SERVE_PYTHON": sys.executable}
        engine_cmd = f"taskset -c 1 {vllm.engine_cmd}" if args.pin else vllm.engine_cmd
        subprocess.run([*CLI, "submit", vllm.model, "--gpus-per-node", "1", "--engine-cmd", engine_cmd, *engine_env,
                        "--env", "VLLM_CPU_KVCACHE_SPACE=1", "--replicas", "1", "--router", "local", "--router-policy", args.policy, "--name",
                        "bench", "--timeout", "300", "--", "--max-model-len", "512", "--enforce-eager"],
                       env=env, capture_output=True, text=True, check=True)
        group = json.loads(subprocess.run([*CLI, "status", "bench", "--json"], env=env, capture_output=True,
                                          text=True, check=True).stdout)
        (replica,) = group["replicas"]
        routed = json.loads(subprocess.run([*CLI, "endpoint", "bench", "--json"], env=env, capture_output=True,
                                           text=True, check=True).stdout)
        key = Path(routed["api_key_file"]).read_text()
        log = (home / "deployments" / group["id"] / "logs" / "node-0.log").read_text()
        bare = "http://127.0.0.1:" + re.search(r"vllm-router on 127\.0\.0\.1:(\d+)", log).group(1) + "/v1"
        paths = {"direct": replica["endpoint"], "bare": bare, "router": routed["url"]}
        model = routed["served_model"]
        for url in paths.values():  # warm-up, every path
            load(url, key, model, args.clients, 1)
        keeper = int(group["id"].removeprefix("local-"))
        router = int(subprocess.run(["pgrep", "-P", str(keeper)], capture_output=True, text=True).stdout.split()[0])
        before = {"front": cpu_seconds(keeper), "router": cpu_seconds(router)}
        rounds = alternating_rounds(args.rounds, paths, key, model, args.clients, args.requests)
        sent = args.rounds * args.clients * args.requests  # per path
        cpu_ms = {"front": (cpu_seconds(keeper) - before["front"]) * 1000 / sent,  # the router path only
                  "router": (cpu_seconds(router) - before["router"]) * 1000 / (2 * sent)}  # bare and router
        subprocess.run([*CLI, "cancel", "bench"], env=env, capture_output=True)
    finally:
        localcluster.down()
    ratio, added, direct, through = medians(rounds, "direct", "router")
    bare_ratio, bare_added, _, bare = medians(rounds, "direct", "bare")
    text = "\n".join([
        f"Median of {args.rounds} alternating rounds; each round {args.clients} concurrent clients x "
        f"{args.requests} streaming chat requests (16 tokens) per path, one replica; "
        f"`python benchmarks/router_overhead.py" + (" --pin" if args.pin else "")
        + (f" --policy {args.policy}" if args.policy != "round_robin" else "") + "`.", "",
        "| path | throughput (req/s) | ratio | target |", "|---|---|---|---|",
        f"| straight to the replica (baseline) | {direct:.2f} | 1.00 | |",
        f"| vllm-router alone, on 127.0.0.1 (no key check; for the breakdown) | {bare:.2f} | {bare_ratio:.2f} | |",
        f"| through the group's URL (key front + vllm-router) | {through:.2f} | {ratio:.2f} | >= 0.97 |", "",
        f"Added median time to first token through the group's URL: {added:+.1f} ms (target <= 3 ms); "
        f"through vllm-router alone: {bare_added:+.1f} ms.", "",
        f"CPU time per request (the processes' utime + stime over the rounds): key front (the keeper's process, "
        f"its 0.25 s membership loop included) {cpu_ms['front']:.2f} ms, vllm-router {cpu_ms['router']:.2f} ms.",
        ""])
    write_results("router_overhead" + ("-pinned" if args.pin else "")
                  + (f"-{args.policy}" if args.policy != "round_robin" else ""), text,
                  {"args": vars(args), "rounds": rounds, "cpu_ms_per_request": cpu_ms})
    return 0 if ratio >= 0.97 and added <= 3 else 1


if __name__ == "__main__":
    sys.exit(main())
