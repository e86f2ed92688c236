"""What the preflight adds to a start, on 2 and 4 nodes (needs root and the vLLM CPU venv).

Usage: python benchmarks/preflight_cost.py [--runs N]

Each run deploys N nodes (mp launcher, TP 8 x PP N) with an engine that does what vLLM does first,
`import torch` with vLLM's own Python, then prints the time and sleeps. Measured: from node 0's
agent start to that line on node 0, i.e. the time before the engine can begin to load, with the
preflight (the default: each node's checks, every node reaching every other, a 16 MiB Gloo
all-reduce run with the same torch) and with `--no-preflight`, which is what a start without any
check costs. Runs are interleaved and their order rotated. The difference of the medians is the
preflight's cost on the way to READY (the weights, the compile and the API come after it and do
not change). Writes benchmarks/results/preflight_cost.{json,md}; docs/reliability.md quotes it.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import cancel_all, run_folder, wait_until, write_results  # noqa: E402
from benchmarks.faults import state as phase_record  # noqa: E402
from hpc_serve.demo import localcluster  # noqa: E402
from hpc_serve.demo.vllm_env import ensure_vllm_env  # noqa: E402
from hpc_serve.node.fabric import all_reduce  # noqa: E402
from hpc_serve.registry import PREFLIGHT, TIMINGS, Deployment  # noqa: E402

CLI = [sys.executable, "-m", "hpc_serve"]
IMPORTED = re.compile(r"ENGINE-IMPORTED (\d+\.\d+)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def one_run(nodes: int, preflight: bool, python: str, home: Path, env: dict) -> dict:
    """Deploy ``nodes`` nodes, with or without the preflight; seconds from agent start to the
    engine's torch imported on node 0, and the preflight's own figures."""
    engine = f"{python} -c 'import time, torch; print(\"ENGINE-IMPORTED %f\" % time.time(), flush=True); time.sleep(10**6)'"
    done = subprocess.run([*CLI, "submit", "org/tiny", "--no-wait", "--nodes", str(nodes), "--gpus-per-node", "8",
                           "--tp", "8", "--pp", str(nodes), "--launcher", "mp", "--engine-cmd", engine,
                           *([] if preflight else ["--no-preflight"])],
                          env={**env, "HPC_SERVE_HOME": str(home)}, capture_output=True, text=True, check=True)
    job = done.stdout.split()[1]
    dep = Deployment(str(home), job)
    log = Path(dep.log_path(0))

    def imported() -> float | None:
        found = IMPORTED.search(log.read_text()) if log.exists() else None
        return float(found.group(1)) if found else None

    at = wait_until(imported, 120, f"the engine on node 0 of job {job} to import torch")
    state = phase_record(dep)
    cancel_all(env)
    start = dep.read(dep.rank_file(TIMINGS, 0))["agent_start"]
    records = dep.rank_records(PREFLIGHT)
    return {"job": job, "to_engine_s": at - start, "phase": state.get("phase"),
            "preflight_took_s": [records[rank]["took_s"] for rank in sorted(records)],
            "bus_gbps": [(records[rank].get("all_reduce") or {}).get("gloo", {}).get("bus_gbps")
                         for rank in sorted(records)]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    python = ensure_vllm_env(print).python
    alone = [all_reduce(python, "127.0.0.1", free_port(), 0, 1, {})["took_s"] for _ in range(args.runs)]
    cluster = localcluster.up(nodes=4)
    results: dict[str, list[dict]] = {}
    try:
        home = run_folder(cluster, "preflight")
        env = {**cluster.env, "HPC_SERVE_PYTHON": sys.executable}
        for index in range(args.runs):
            for nodes in (2, 4):
                for preflight in ((True, False) if index % 2 == 0 else (False, True)):
                    key = f"{nodes} nodes, {'preflight' if preflight else '--no-preflight'}"
                    results.setdefault(key, []).append(one_run(nodes, preflight, python, home, env))
                    print(f"run {index + 1}, {key}: {results[key][-1]}", flush=True)
    finally:
        localcluster.down()
    med = {key: statistics.median(r["to_engine_s"] for r in runs) for key, runs in results.items()}
    lines = [f"{args.runs} runs of each, interleaved, on the local Slurm cluster (4 network namespaces "
             "sharing this machine's CPUs; mp launcher, TP 8 x PP N, an engine that imports vLLM's torch); "
             "`python benchmarks/preflight_cost.py`.", "",
             "| nodes | agent start to the engine's torch imported, with preflight, s (median) | "
             "with --no-preflight, s (median) | preflight's cost, s | ratio | the preflight on each node, "
             "s (median) | Gloo all-reduce bus bandwidth, GB/s (median) |", "|---|---|---|---|---|---|---|"]
    for nodes in (2, 4):
        ours, plain = f"{nodes} nodes, preflight", f"{nodes} nodes, --no-preflight"
        took = statistics.median(t for r in results[ours] for t in r["preflight_took_s"])
        bus = statistics.median(b for r in results[ours] for b in r["bus_gbps"] if b)
        lines.append(f"| {nodes} | {med[ours]:.2f} | {med[plain]:.2f} | {med[ours] - med[plain]:+.2f} | "
                     f"{med[ours] / med[plain]:.2f} | {took:.2f} | {bus:.2f} |")
    lines += ["", f"The all-reduce's script alone on this machine (one process: Python, `import torch`, Gloo's "
              f"set-up), as each node of a real cluster runs it on its own CPUs: {statistics.median(alone):.2f} s "
              f"(median of {args.runs}). Here the nodes share {os.cpu_count()} CPUs, so their imports queue."]
    text = "\n".join(lines) + "\n"
    write_results("preflight_cost", text, {"runs": args.runs, "results": results, "medians": med,
                                           "all_reduce_alone_s": alone})
    return 0


if __name__ == "__main__":
    sys.exit(main())
