"""Start-up of a deployment against a plain sbatch of `vllm serve`, with real vLLM (needs root).

Usage: python benchmarks/bootstrap.py [--runs N] [--nodes 1 2] [--compile]

- The baseline is what a user does instead: a plain sbatch script running `vllm serve` on every
  node (benchmarks/hand_launch.py), with vLLM's caches where the user has them (its defaults,
  shared by the runs: warm). Measured: sbatch -> first 200 on /health.
- hpc-serve: `hpc-serve submit --launcher mp` with its defaults (the user's compile cache, shared
  by the runs) -> READY in the registry. Target: at most the baseline + 1 s.
- Both run once first to warm the caches (not counted), then interleaved, alternating which goes
  first; medians. Also the agent's own share (job start -> READY minus the hand-launched vLLM's
  start -> /health) and the readiness latency (READY minus the first 200 on /health seen by a
  poller asking every 20 ms from outside the node; target <= 0.5 s).
Both use the tiny offline model and the CPU build of vLLM, TP across the nodes, `--enforce-eager`
unless --compile. Writes benchmarks/results/bootstrap.{json,md}.
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
from hpc_serve.demo import localcluster  # noqa: E402
from hpc_serve.demo.vllm_env import ensure_vllm_env  # noqa: E402
from hpc_serve.planner.ports import job_ports  # noqa: E402

CLI = [sys.executable, "-m", "hpc_serve"]






def by_hand(nodes: int, shared: Path, env: dict, vllm, eager: bool) -> tuple[float, float]:
    """(sbatch -> first 200 on /health, vLLM start -> first 200) of a plain sbatch of `vllm serve`."""
    out = shared / "hand"
    out.mkdir(exist_ok=True)
    script = out / f"hand-{nodes}.sbatch"
    script.write_text(
        "#!/bin/bash\n"
        f"#SBATCH --nodes={nodes}\n#SBATCH --ntasks-per-node=1\n#SBATCH --gpus-per-node=1\n"
        f"#SBATCH --output={out}/hand-%j.out\n"
        'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)\n'
        f"srun --nodes={nodes} --ntasks={nodes} --kill-on-bad-exit=1 {vllm.python} {HERE / 'hand_launch.py'} "
        f"'{vllm.engine_cmd}' {vllm.model} {nodes} \"$head\" 29100 29101 {'eager' if eager else 'compile'}\n")
    asked = time.time()
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
    return found["health"] - asked, found["health"] - found["start"]


def ours(nodes: int, shared: Path, env: dict, vllm, cluster, eager: bool) -> tuple[float, float, float]:
    """(submit -> READY, job start -> READY, readiness latency) of `hpc-serve submit`."""
    home = shared / "bench-bootstrap-home"
    layout = ["--nodes", str(nodes), "--gpus-per-node", "1", "--launcher", "mp"]
    layout += ["--tp", str(nodes), "--cross-node-tp"] if nodes > 1 else []
    asked = time.time()
    done = subprocess.run([*CLI, "submit", "--no-wait", vllm.model, *layout, "--engine-cmd", vllm.engine_cmd,
                           "--env", "VLLM_CPU_KVCACHE_SPACE=1", "--", "--max-model-len", "512",
                           *(["--enforce-eager"] if eager else [])],
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
    return ready_at - asked, ready_at - timings["job_start"], ready_at - first_200[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--compile", action="store_true", help="without --enforce-eager (torch.compile)")
    args = parser.parse_args()
    eager = not args.compile
    vllm = ensure_vllm_env(print)
    cluster = localcluster.up(nodes=max(args.nodes))
    results: dict[str, dict[str, list[float]]] = {}
    try:
        shared = run_folder(cluster, "bootstrap")
        # one HOME for both, on the shared path: vLLM's default caches there, as a user's home
        env = {**cluster.env, "HPC_SERVE_PYTHON": sys.executable, "HOME": str(shared / "user-home"),
               "XDG_CACHE_HOME": str(shared / "user-home" / ".cache")}
        for nodes in args.nodes:
            by_hand(nodes, shared, env, vllm, eager)  # warm the caches: users restart the same model
            ours(nodes, shared, env, vllm, cluster, eager)
            runs = results.setdefault(str(nodes), {"sbatch": [], "vllm_start": [], "hpc_serve": [],
                                                   "job_start": [], "readiness_latency": []})
            for index in range(args.runs):  # interleaved, alternating, so drift affects both alike
                for who in (("hand", "ours") if index % 2 == 0 else ("ours", "hand")):
                    if who == "hand":
                        asked, started = by_hand(nodes, shared, env, vllm, eager)
                        runs["sbatch"].append(asked)
                        runs["vllm_start"].append(started)
                    else:
                        asked, started, latency = ours(nodes, shared, env, vllm, cluster, eager)
                        runs["hpc_serve"].append(asked)
                        runs["job_start"].append(started)
                        runs["readiness_latency"].append(latency)
                print(f"{nodes} node(s), run {index + 1}: plain sbatch {runs['sbatch'][-1]:.2f} s, "
                      f"hpc-serve {runs['hpc_serve'][-1]:.2f} s, readiness latency "
                      f"{runs['readiness_latency'][-1]:.3f} s", flush=True)
    finally:
        localcluster.down()
    mode = "`--enforce-eager`" if eager else "torch.compile (no `--enforce-eager`)"
    lines = [f"Median of {args.runs} interleaved runs per size after one warm-up run of each, real vLLM (CPU "
             f"build) serving the tiny model, {mode}, TP across the nodes, mp launcher, warm caches where "
             f"each keeps them; `python benchmarks/bootstrap.py{' --compile' if args.compile else ''}`.", "",
             "| nodes | plain sbatch of `vllm serve`: submit -> /health (s) | hpc-serve: submit -> READY (s) | "
             "difference (s) | target | agent's share (s) | readiness latency (s) | target |",
             "|---|---|---|---|---|---|---|---|"]
    ok = True
    for nodes, runs in results.items():
        hand, mine = statistics.median(runs["sbatch"]), statistics.median(runs["hpc_serve"])
        share = statistics.median(runs["job_start"]) - statistics.median(runs["vllm_start"])
        latency = statistics.median(runs["readiness_latency"])
        lines.append(f"| {nodes} | {hand:.2f} | {mine:.2f} | {mine - hand:+.2f} | <= +1 | {share:+.2f} | "
                     f"{latency:.3f} | <= 0.5 |")
        ok = ok and mine - hand <= 1 and latency <= 0.5
    text = "\n".join(lines) + "\n"
    write_results("bootstrap-compile" if args.compile else "bootstrap", text,
                  {"runs": args.runs, "eager": eager, "results": results})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
