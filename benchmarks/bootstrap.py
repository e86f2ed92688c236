"""Bootstrap overhead and readiness latency of hpc-serve's agent, with real vLLM (needs root).

Usage: python benchmarks/bootstrap.py [--runs N] [--nodes 1 2]

- Bootstrap overhead = (job start -> READY through `hpc-serve submit --launcher mp`) minus
  (vLLM start -> first 200 on /health, vLLM launched by hand on the same nodes by
  benchmarks/hand_launch.py), medians of interleaved runs; target <= 2 s.
- Readiness latency = READY written in the registry minus the first 200 on /health seen by a
  poller that asks every 20 ms from outside the node; target <= 0.5 s.
Both use the tiny offline model and the CPU build of vLLM, `--enforce-eager`, TP across the nodes.
Writes benchmarks/results/bootstrap.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import queue_empty, run_folder, wait_until, write_results  # noqa: E402
from hpc_serve import localcluster  # noqa: E402
from hpc_serve.demo.vllm_env import ensure_vllm_env  # noqa: E402
from hpc_serve.ports import job_ports  # noqa: E402

CLI = [sys.executable, "-m", "hpc_serve"]






def by_hand(nodes: int, shared: Path, env: dict, vllm) -> float:
    out = shared / "hand"
    out.mkdir(exist_ok=True)
    script = out / f"hand-{nodes}.sbatch"
    script.write_text(
        "#!/bin/bash\n"
        f"#SBATCH --nodes={nodes}\n#SBATCH --ntasks-per-node=1\n#SBATCH --gpus-per-node=1\n"
        f"#SBATCH --output={out}/hand-%j.out\n"
        'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)\n'
        f"srun --nodes={nodes} --ntasks={nodes} --kill-on-bad-exit=1 {vllm.python} {HERE / 'hand_launch.py'} "
        f"'{vllm.engine_cmd}' {vllm.model} {nodes} \"$head\" 29100 29101\n")
    job = subprocess.run(["sbatch", "--parsable", str(script)], env=env, cwd=out, capture_output=True,
                         text=True, check=True).stdout.strip()
    log = out / f"hand-{job}.out"

    def result():
        text = log.read_text() if log.exists() else ""
        if "RESULT-FAILED" in text:
            raise RuntimeError(text)
        line = next((l for l in text.splitlines() if l.startswith("RESULT ")), None)
        return json.loads(line[len("RESULT "):]) if line else None

    found = wait_until(result, 300, "the hand-launched vLLM to answer /health")
    subprocess.run(["scancel", job], env=env)
    wait_until(lambda: queue_empty(env), 60, "the hand-launched job to end")
    return found["health"] - found["start"]


def ours(nodes: int, shared: Path, env: dict, vllm, cluster) -> tuple[float, float]:
    home = shared / "bench-bootstrap-home"
    layout = ["--nodes", str(nodes), "--gpus-per-node", "1", "--launcher", "mp"]
    layout += ["--tp", str(nodes), "--cross-node-tp"] if nodes > 1 else []
    done = subprocess.run([*CLI, "submit", "--no-wait", vllm.model, *layout, "--engine-cmd", vllm.engine_cmd,
                           "--env", "VLLM_CPU_KVCACHE_SPACE=1", "--", "--max-model-len", "512", "--enforce-eager"],
                          env={**env, "HPC_SERVE_HOME": str(home)}, capture_output=True, text=True, check=True)
    job = done.stdout.split()[1]
    url = f"http://{cluster.node_ip('node1')}:{job_ports(int(job)).api}/health"
    first_200: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set() and not first_200:
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        first_200.append(time.time())
            except OSError:
                pass
            time.sleep(0.02)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    folder = home / "deployments" / job

    def ready():
        state = json.loads((folder / "state.json").read_text()) if (folder / "state.json").exists() else {}
        if state.get("phase") == "FAILED":
            raise RuntimeError(state["reason"])
        return state if state.get("phase") == "READY" else None

    state = wait_until(ready, 300, "hpc-serve's deployment to be READY")
    stop.set()
    poller.join(2)
    timings = json.loads((folder / "timings" / "0.json").read_text())
    ready_at = state["history"][-1]["at"]
    subprocess.run([*CLI, "cancel", job], env={**env, "HPC_SERVE_HOME": str(home)}, capture_output=True)
    wait_until(lambda: queue_empty(env), 60, "our job to end")
    return ready_at - timings["job_start"], ready_at - first_200[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    vllm = ensure_vllm_env(print)
    cluster = localcluster.up(nodes=max(args.nodes))
    results: dict[str, dict[str, list[float]]] = {}
    try:
        shared = run_folder(cluster, "bootstrap")
        env = {**cluster.env, "HPC_SERVE_PYTHON": sys.executable}
        for nodes in args.nodes:
            runs = results.setdefault(str(nodes), {"by_hand": [], "hpc_serve": [], "readiness_latency": []})
            for index in range(args.runs):  # interleaved, so drift affects both alike
                runs["by_hand"].append(by_hand(nodes, shared, env, vllm))
                total, latency = ours(nodes, shared, env, vllm, cluster)
                runs["hpc_serve"].append(total)
                runs["readiness_latency"].append(latency)
                print(f"{nodes} node(s), run {index + 1}: by hand {runs['by_hand'][-1]:.2f} s, "
                      f"hpc-serve {total:.2f} s, readiness latency {latency:.3f} s", flush=True)
    finally:
        localcluster.down()
    lines = [f"Median of {args.runs} interleaved runs per size, real vLLM (CPU build) serving the tiny model, "
             "`--enforce-eager`, TP across the nodes, mp launcher; `python benchmarks/bootstrap.py`.", "",
             "| nodes | vLLM by hand: start -> /health (s) | hpc-serve: job start -> READY (s) | "
             "bootstrap overhead (s) | target | readiness latency (s) | target |",
             "|---|---|---|---|---|---|---|"]
    ok = True
    for nodes, runs in results.items():
        hand, mine = statistics.median(runs["by_hand"]), statistics.median(runs["hpc_serve"])
        latency = statistics.median(runs["readiness_latency"])
        lines.append(f"| {nodes} | {hand:.2f} | {mine:.2f} | {mine - hand:+.2f} | <= 2 | {latency:.3f} | <= 0.5 |")
        ok = ok and mine - hand <= 2 and latency <= 0.5
    text = "\n".join(lines) + "\n"
    write_results("bootstrap", text, {"runs": args.runs, "results": results})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
