"""How fast each fault is detected and recorded (needs root).

Usage: python benchmarks/faults.py [--runs N]

Each run deploys 2 nodes (mp launcher, a stand-in engine that sleeps: detection is the agents'
work, and the agents treat every engine alike), injects one fault, and measures from the
injection to the phase the registry records. Baseline, measured in the same run: what Slurm
itself shows at that moment (for an engine crash, when the job leaves the queue, which is what a
plain `srun --kill-on-bad-exit` script gives; for a frozen node, whether Slurm has noticed at all:
it waits SlurmdTimeout, 300 s here and by default, before it marks a node down).
Writes benchmarks/results/faults.{json,md}; docs/reliability.md quotes it.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import cancel_all, run_folder, wait_until, write_results  # noqa: E402
from hpc_serve.demo import localcluster  # noqa: E402
from hpc_serve.registry import BEATS, CorruptRecord, Deployment  # noqa: E402

CLI = [sys.executable, "-m", "hpc_serve"]
SCENARIOS = ("engine killed on node 2", "node 2 frozen", "node 1 (node 0's) frozen",
             "agent killed on node 2", "agent killed on node 1 (node 0's)",
             "hpc-serve cancel", "plain scancel", "scontrol requeue")


def state(dep: Deployment) -> dict:
    try:
        return dep.state
    except CorruptRecord:
        return {}


def beats(dep: Deployment, rank: int) -> int:
    """Node ``rank``'s heartbeat counter (0 before its first beat)."""
    return dep.rank_records(BEATS).get(rank, {}).get("beat", 0)


def squeue(env: dict, job: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], env=env, capture_output=True,
                          text=True).stdout.strip()


def node_state(env: dict, node: str) -> str:
    return subprocess.run(["sinfo", "-h", "-n", node, "-o", "%T"], env=env, capture_output=True,
                          text=True).stdout.strip()


def signal_namespace(cluster, node: str, sig: int, only_marked: str | None = None) -> None:
    """Send ``sig`` to every process of ``node`` (or only those an agent of job/rank started)."""
    for pid in localcluster.namespace_pids(cluster.namespace(node)):
        try:
            if only_marked and f"HPC_SERVE_PROCESS={only_marked}\0".encode() not in Path(
                    f"/proc/{pid}/environ").read_bytes():
                continue
            os.kill(pid, sig)
        except OSError:
            continue


def one_run(scenario: str, cluster, home: Path, env: dict) -> dict:
    stand_in = f"{sys.executable} -c 'import time; time.sleep(10**6)'"
    done = subprocess.run([*CLI, "submit", "org/tiny", "--no-wait", "--nodes", "2", "--gpus-per-node", "8",
                           "--tp", "8", "--pp", "2", "--launcher", "mp", "--engine-cmd", stand_in],
                          env={**env, "HPC_SERVE_HOME": str(home)}, capture_output=True, text=True, check=True)
    job = done.stdout.split()[1]
    dep = Deployment(str(home), job)
    wait_until(lambda: state(dep).get("phase") == "LOADING", 60, "both nodes to start")
    # the agents are running: each one's heartbeat counter has moved a few times
    wait_until(lambda: all(beats(dep, rank) >= 3 for rank in (0, 1)), 30, "a few heartbeats of each node")
    records = dep.nodes()
    by_rank = {rank: records[rank]["hostname"] for rank in (0, 1)}
    agents = {rank: records[rank]["pid"] for rank in (0, 1)}
    frozen = None
    at = time.time()
    if scenario == "engine killed on node 2":
        signal_namespace(cluster, by_rank[1], signal.SIGKILL, only_marked=f"{job}/1")
    elif scenario.startswith("agent killed"):
        os.kill(agents[1 if "node 2" in scenario else 0], signal.SIGKILL)
    elif scenario == "plain scancel":
        subprocess.run(["scancel", job], env=env, check=True)
    elif scenario == "node 2 frozen":
        frozen = by_rank[1]
    elif scenario == "node 1 (node 0's) frozen":
        frozen = by_rank[0]
    elif scenario == "hpc-serve cancel":
        subprocess.Popen([*CLI, "cancel", job], env={**env, "HPC_SERVE_HOME": str(home)},
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    elif scenario == "scontrol requeue":
        subprocess.run(["scontrol", "requeue", job], env=env, check=True)
    if frozen:
        signal_namespace(cluster, frozen, signal.SIGSTOP)
    try:
        ended = wait_until(lambda: state(dep) if state(dep).get("phase") in
                           ("FAILED", "STOPPED", "RESTARTING") else None, 60, f"{scenario} to be recorded")
        slurm_saw = squeue(env, job) or "left the queue"
        slurm_node = node_state(env, frozen) if frozen else ""
    finally:
        if frozen:
            signal_namespace(cluster, frozen, signal.SIGCONT)
    recorded = ended["history"][-1]["at"] - at
    gone = wait_until(lambda: not squeue(env, job) or (scenario == "scontrol requeue"
                                                         and squeue(env, job) == "PENDING"), 90, "the job to end")
    left_queue = time.time() - at if gone else None
    cancel_all(env)
    return {"recorded_s": recorded, "phase": ended["phase"], "reason": ended["reason"].splitlines()[0],
            "job_state_when_recorded": slurm_saw, "node_state_when_recorded": slurm_node,
            "queue_end_s": left_queue}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    cluster = localcluster.up(nodes=4)
    results: dict[str, list[dict]] = {name: [] for name in SCENARIOS}
    try:
        home = run_folder(cluster, "faults")
        env = {**cluster.env, "HPC_SERVE_PYTHON": sys.executable}
        for index in range(args.runs):
            for scenario in SCENARIOS:  # interleaved, so drift affects every scenario alike
                results[scenario].append(one_run(scenario, cluster, home, env))
                print(f"run {index + 1}, {scenario}: {results[scenario][-1]}", flush=True)
    finally:
        localcluster.down()
    lines = [f"Median of {args.runs} runs per fault on the local Slurm cluster (2-node deployments, "
             "stand-in engine); `python benchmarks/faults.py`. Times count from the fault's injection.", "",
             "| fault | recorded as | recorded after, s (median; min-max) | Slurm at that moment | "
             "job left the queue after, s |", "|---|---|---|---|---|"]
    for scenario, runs in results.items():
        times = [r["recorded_s"] for r in runs]
        queue = [r["queue_end_s"] for r in runs if r["queue_end_s"] is not None]
        seen = sorted({r["job_state_when_recorded"] + (f", node {r['node_state_when_recorded']}"
                                                        if r["node_state_when_recorded"] else "") for r in runs})
        queue_text = f"{statistics.median(queue):.2f}" if queue else "-"
        lines.append(f"| {scenario} | {runs[0]['phase']}: {runs[0]['reason'][:70]} | "
                     f"{statistics.median(times):.2f} ({min(times):.2f}-{max(times):.2f}) | "
                     f"{'; '.join(seen)} | {queue_text} |")
    text = "\n".join(lines) + "\n"
    write_results("faults", text, {"runs": args.runs, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
