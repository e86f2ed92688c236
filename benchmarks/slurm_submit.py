"""Submission overhead and status speed on the local Slurm cluster (needs root).

Usage: python benchmarks/slurm_submit.py [--runs N]
- submit-to-RUNNING of `hpc-serve submit` vs a bare `sbatch` of the script `hpc-serve render`
  gives for the same deployment, interleaved, medians and their ratio (target <= 1.2);
- `hpc-serve status` and `hpc-serve list --all` with 50 deployments in the registry (<= 0.3 s).
Writes benchmarks/results/slurm_submit.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import run_folder  # noqa: E402
from hpc_serve.demo import localcluster  # noqa: E402
from hpc_serve.planner.launch import make_plan  # noqa: E402
from hpc_serve.registry import Registry  # noqa: E402
from hpc_serve.planner.spec import build_spec  # noqa: E402

CLI = [sys.executable, "-m", "hpc_serve"]
LAYOUT = ["org/tiny", "--nodes", "2", "--gpus-per-node", "8", "--tp", "8", "--pp", "2", "--launcher", "mp"]


def running(job_id: str, env: dict) -> bool:
    done = subprocess.run(["squeue", "--noheader", "--format=%T", "--jobs", job_id], env=env,
                          capture_output=True, text=True)
    return done.stdout.strip() == "RUNNING"


def until_running(start: float, job_id: str, env: dict) -> float:
    while not running(job_id, env):
        if time.perf_counter() - start > 60:
            raise RuntimeError(f"job {job_id} not RUNNING after 60 s")
        time.sleep(0.01)
    return time.perf_counter() - start


def cancel_all(env: dict) -> None:
    subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True)
    while subprocess.run(["squeue", "--noheader"], env=env, capture_output=True, text=True).stdout.strip():
        time.sleep(0.05)


def one_submit(env: dict) -> float:
    start = time.perf_counter()
    done = subprocess.run([*CLI, "submit", *LAYOUT, "--no-wait"], env=env, capture_output=True, text=True, check=True)
    return until_running(start, done.stdout.split()[1], env)


def one_sbatch(script: Path, env: dict) -> float:
    start = time.perf_counter()
    done = subprocess.run(["sbatch", "--parsable", str(script)], env=env, cwd=script.parent,
                          capture_output=True, text=True, check=True)
    return until_running(start, done.stdout.strip(), env)


def status_times(home: Path, env: dict, runs: int) -> dict[str, float]:
    registry = Registry(str(home))
    spec = build_spec(model="org/tiny", gpus_per_node=8, nodes=2, tp=8, pp=2, launcher="mp")
    plan = make_plan(spec).to_dict()
    for index in range(50):
        dep = registry.deployment(str(900000 + index)).ensure()
        dep.write("spec.json", spec.to_dict())
        dep.write("plan.json", plan)
        dep.write("job.json", {"job_id": dep.id, "slurm_job_id": dep.id, "executor": "slurm",
                               "name": f"d{index}", "submitted": time.time()})
        for rank in range(2):
            dep.write(f"nodes/{rank}.json", {"rank": rank, "hostname": f"node{rank + 1}"})
        dep.set_phase("STARTING", "all 2 nodes reported")
    out = {}
    for label, args in (("status (50 deployments)", ["status"]), ("list --all (50 deployments)", ["list", "--all"])):
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            subprocess.run([*CLI, *args], env={**env, "HPC_SERVE_HOME": str(home)}, capture_output=True, check=True)
            times.append(time.perf_counter() - start)
        out[label] = statistics.median(times)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    cluster = localcluster.up(nodes=4)
    try:
        shared = run_folder(cluster, "slurm-submit")
        home = shared / "home"
        env = {**cluster.env, "HPC_SERVE_HOME": str(home), "HPC_SERVE_PYTHON": sys.executable}
        script = shared / "bench.sbatch"
        subprocess.run([*CLI, "render", *LAYOUT, "-o", str(script)], env=env, check=True, capture_output=True)
        ours, bare = [], []
        for _ in range(args.runs):  # interleaved, so drift affects both alike
            bare.append(one_sbatch(script, env))
            cancel_all(env)
            ours.append(one_submit(env))
            cancel_all(env)
        timings = status_times(shared / "status", cluster.env, args.runs * 3)
    finally:
        localcluster.down()
    med_ours, med_bare = statistics.median(ours), statistics.median(bare)
    ratio = med_ours / med_bare
    lines = [f"Median of {args.runs} interleaved runs each on the 4-node local cluster; "
             "`python benchmarks/slurm_submit.py`.", "",
             "| submit-to-RUNNING | median (s) | ratio | target |", "|---|---|---|---|",
             f"| bare `sbatch` of the rendered script (baseline) | {med_bare:.3f} | 1.00 | |",
             f"| `hpc-serve submit` (submitit) | {med_ours:.3f} | {ratio:.2f} | <= 1.2 |", "",
             "| registry command | median (s) | target |", "|---|---|---|"]
    lines += [f"| `hpc-serve {name}` | {seconds:.3f} | <= 0.3 s |" for name, seconds in timings.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "slurm_submit.md").write_text(text)
    (HERE / "results" / "slurm_submit.json").write_text(json.dumps(
        {"runs": args.runs, "submit_s": ours, "sbatch_s": bare, "ratio": ratio, "status_s": timings}, indent=2) + "\n")
    return 0 if ratio <= 1.2 and all(s <= 0.3 for s in timings.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
