"""How a 4-node `hpc-serve cancel` ends, run after run (needs root).

Usage: python benchmarks/cancel_four_nodes.py [--runs N] [--name NAME]

Each run deploys 4 nodes (mp launcher, TP 8 x PP 4, a stand-in engine that sleeps: ending is the
agents' work), waits until every node's heartbeat has moved, then runs `hpc-serve cancel` and
measures: when the CLI returned, when STOPPED was recorded (and by whom: the agent's reason is
"cancelled (hpc-serve cancel)"; the CLI's fallback says the agent did not record it), and when the
job left the queue. Baseline, in the same run and interleaved: a plain `scancel` of the same kind
of deployment, then waiting until the job leaves the queue, which is what a user without
hpc-serve does. Writes benchmarks/results/<NAME>.{json,md} (default cancel_four_nodes);
docs/reliability.md quotes it.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import cancel_all, run_folder, wait_until, write_results  # noqa: E402
from benchmarks.faults import state as phase_record  # noqa: E402
from hpc_serve.demo import localcluster  # noqa: E402
from hpc_serve.registry import BEATS, Deployment  # noqa: E402

CLI = [sys.executable, "-m", "hpc_serve"]
AGENT_REASON = "cancelled (hpc-serve cancel)"


def in_queue(env: dict, job: str) -> bool:
    return bool(subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], env=env, capture_output=True,
                               text=True).stdout.strip())


def one_run(how: str, home: Path, env: dict) -> dict:
    """Deploy 4 nodes, end them ``how`` ("hpc-serve cancel" or "plain scancel"), and time it."""
    stand_in = f"{sys.executable} -c 'import time; time.sleep(10**6)'"
    user_env = {**env, "HPC_SERVE_HOME": str(home)}
    done = subprocess.run([*CLI, "submit", "org/tiny", "--no-wait", "--nodes", "4", "--gpus-per-node", "8",
                           "--tp", "8", "--pp", "4", "--launcher", "mp", "--engine-cmd", stand_in],
                          env=user_env, capture_output=True, text=True, check=True)
    job = done.stdout.split()[1]
    dep = Deployment(str(home), job)
    wait_until(lambda: phase_record(dep).get("phase") == "LOADING", 60, "all four nodes to start")
    wait_until(lambda: all(dep.rank_records(BEATS).get(rank, {}).get("beat", 0) >= 2 for rank in range(4)),
               30, "two heartbeats of every node")
    at = time.time()
    if how == "hpc-serve cancel":
        ended = subprocess.run([*CLI, "cancel", job], env=user_env, capture_output=True, text=True)
        command_s, code = time.time() - at, ended.returncode
    else:
        ended = subprocess.run(["scancel", job], env=env, capture_output=True, text=True)
        command_s, code = time.time() - at, ended.returncode
    wait_until(lambda: not in_queue(env, job), 60, "the job to leave the queue")
    queue_s = time.time() - at
    record = wait_until(lambda: phase_record(dep) if phase_record(dep).get("phase") in
                        ("STOPPED", "FAILED") else None, 30, "the end to be recorded")
    cancel_all(env)
    return {"command_s": command_s, "exit_code": code, "queue_end_s": queue_s,
            "recorded_s": record["history"][-1]["at"] - at, "phase": record["phase"],
            "reason": record["reason"].splitlines()[0]}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--name", default="cancel_four_nodes", help="results file name")
    args = parser.parse_args()
    cluster = localcluster.up(nodes=4)
    ways = ("hpc-serve cancel", "plain scancel")
    results: dict[str, list[dict]] = {how: [] for how in ways}
    try:
        home = run_folder(cluster, "cancel4")
        env = {**cluster.env, "HPC_SERVE_PYTHON": sys.executable}
        for index in range(args.runs):
            for how in (ways if index % 2 == 0 else ways[::-1]):  # interleaved, order rotated
                results[how].append(one_run(how, home, env))
                print(f"run {index + 1}, {how}: {results[how][-1]}", flush=True)
    finally:
        localcluster.down()
    ours, plain = results["hpc-serve cancel"], results["plain scancel"]
    by_agent = sum(r["phase"] == "STOPPED" and r["reason"] == AGENT_REASON and r["exit_code"] == 0 for r in ours)
    before_queue = sum(r["recorded_s"] <= r["queue_end_s"] for r in ours)
    ours_end, plain_end = median([r["queue_end_s"] for r in ours]), median([r["queue_end_s"] for r in plain])
    lines = [f"{args.runs} runs of each, interleaved, on the local 4-node Slurm cluster (TP 8 x PP 4, "
             "stand-in engine); `python benchmarks/cancel_four_nodes.py`. Times count from the command.", "",
             f"- `hpc-serve cancel`: STOPPED recorded by the agents ({AGENT_REASON!r}, exit code 0) in "
             f"{by_agent} of {len(ours)} runs; recorded before the job left the queue in {before_queue} "
             f"of {len(ours)}.", "",
             "| how | command returned after, s (median; max) | STOPPED recorded after, s (median; max) | "
             "job left the queue after, s (median; max) |", "|---|---|---|---|"]
    for how, runs in results.items():
        cells = [f"{median([r[key] for r in runs]):.2f}; {max(r[key] for r in runs):.2f}"
                 for key in ("command_s", "recorded_s", "queue_end_s")]
        lines.append(f"| {how} | {' | '.join(cells)} |")
    lines += ["", f"Ratio, job out of the queue, `hpc-serve cancel` / plain `scancel` (medians): "
              f"{ours_end / plain_end:.2f}"]
    text = "\n".join(lines) + "\n"
    write_results(args.name, text, {"runs": args.runs, "results": results, "recorded_by_agent": by_agent,
                                    "recorded_before_queue_end": before_queue})
    return 0 if by_agent == len(ours) else 1


if __name__ == "__main__":
    sys.exit(main())
