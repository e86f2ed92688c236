"""Ray cluster formation: hpc-serve's agent vs the fixed-sleep bootstrap (needs root).

Usage: python benchmarks/ray_formation.py [--runs N] [--nodes 2 4]

Baseline, in the same run on the same local Slurm cluster: the bootstrap of vec-inf's templates
and of Ray's own Slurm example (`ray start --head` then `sleep 10`, then one `ray start
--address` per worker each followed by `sleep 5`, no check that anyone joined). It is "formed"
when its sleeps end; at that moment the benchmark asks Ray how many nodes really joined.
Ours: `hpc-serve submit --launcher ray`, from the job's start to the moment the agent has seen
every node and every GPU in Ray (it records both in the registry). Same Ray, same token auth.
Writes benchmarks/results/ray_formation.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import cancel_all, run_folder, wait_until, write_results  # noqa: E402
from hpc_serve.demo import localcluster  # noqa: E402
from hpc_serve.demo.vllm_env import ensure_vllm_env  # noqa: E402

CLI = [sys.executable, "-m", "hpc_serve"]
GPUS = 2
COUNT_ALIVE = ("import json, sys; from ray._raylet import GcsClient; "
               "infos = GcsClient(address=sys.argv[1]).get_all_node_info(timeout=10).values(); "
               "alive = [i for i in infos if i.state == 0]; "
               "print(json.dumps({'alive': len(alive), 'gpus': sum(dict(i.resources_total).get('GPU', 0) "
               "for i in alive)}))")

FIXED_SLEEP_SCRIPT = """#!/bin/bash
#SBATCH --job-name=fixed-sleep-ray
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={gpus}
#SBATCH --output={out}/fixed-sleep-%j.out
t0=$(date +%s.%N)
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={out}/ray_token RAY_USAGE_STATS_ENABLED=0
nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
head_ip=$(getent hosts "${{nodes[0]}}" | awk '{{print $1}}')
port=$((20000 + SLURM_JOB_ID % 700 * 16 + 9))
srun --nodes=1 --ntasks=1 -w "${{nodes[0]}}" --overlap {ray} start --head --node-ip-address="$head_ip" \\
  --port=$port --num-gpus={gpus} --include-dashboard=false --temp-dir /tmp/fixed-sleep --block &
sleep 10
for ((i = 1; i < {nodes}; i++)); do
  srun --nodes=1 --ntasks=1 -w "${{nodes[$i]}}" --overlap {ray} start --address "$head_ip:$port" \\
    --num-gpus={gpus} --block &
  sleep 5
done
t1=$(date +%s.%N)
joined=$(srun --nodes=1 --ntasks=1 -w "${{nodes[0]}}" --overlap {python} -c "{count}" "$head_ip:$port")
echo "RESULT {{\\"t0\\": $t0, \\"t1\\": $t1, \\"joined\\": $joined}}"
"""






def fixed_sleep(nodes: int, shared: Path, env: dict, vllm_python: str) -> dict:
    out = shared / "fixed-sleep"
    out.mkdir(exist_ok=True)
    (out / "ray_token").write_text("f" * 64)
    (out / "ray_token").chmod(0o600)
    script = out / f"fixed-sleep-{nodes}.sbatch"
    ray = str(Path(vllm_python).parent / "ray")
    script.write_text(FIXED_SLEEP_SCRIPT.format(nodes=nodes, gpus=GPUS, out=out, ray=ray, python=vllm_python,
                                                count=COUNT_ALIVE.replace('"', '\\"')))
    job = subprocess.run(["sbatch", "--parsable", str(script)], env=env, cwd=out, capture_output=True,
                         text=True, check=True).stdout.strip()
    log = out / f"fixed-sleep-{job}.out"
    line = wait_until(lambda: next((l for l in log.read_text().splitlines() if l.startswith("RESULT ")), None)
                      if log.exists() else None, 120, "the fixed-sleep job's result")
    result = json.loads(line[len("RESULT "):])
    cancel_all(env)
    return {"seconds": result["t1"] - result["t0"], "joined": result["joined"]["alive"],
            "gpus": result["joined"]["gpus"], "verified": False}


def ours(nodes: int, shared: Path, env: dict, vllm_python: str) -> dict:
    home = shared / "bench-ray-home"
    stand_in = f"{vllm_python} -c 'import time; time.sleep(10**6)'"
    done = subprocess.run([*CLI, "submit", "org/tiny", "--no-wait", "--nodes", str(nodes), "--gpus-per-node",
                           str(GPUS), "--tp", str(GPUS), "--pp", str(nodes), "--launcher", "ray",
                           "--ray-cmd", str(Path(vllm_python).parent / "ray"), "--engine-cmd", stand_in],
                          env={**env, "HPC_SERVE_HOME": str(home)}, capture_output=True, text=True, check=True)
    job = done.stdout.split()[1]
    folder = home / "deployments" / job

    def formed():
        timings = json.loads((folder / "timings" / "0.json").read_text()) if (folder / "timings" / "0.json").exists() else {}
        state = json.loads((folder / "state.json").read_text()) if (folder / "state.json").exists() else {}
        if state.get("phase") == "FAILED":
            raise RuntimeError(state["reason"])
        return timings if "ray_formed" in timings else None

    timings = wait_until(formed, 120, "hpc-serve's Ray cluster to form")
    cancel_all(env)
    return {"seconds": timings["ray_formed"] - timings["job_start"], "joined": nodes, "gpus": nodes * GPUS,
            "verified": True, "ray_start_to_formed": timings["ray_formed"] - timings["ray_started"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--nodes", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    vllm_python = ensure_vllm_env(print).python
    cluster = localcluster.up(nodes=max(args.nodes))
    results: dict[str, dict[str, list[dict]]] = {}
    try:
        shared = run_folder(cluster, "ray_formation")
        env = {**cluster.env, "HPC_SERVE_PYTHON": sys.executable}
        for nodes in args.nodes:
            runs = results.setdefault(str(nodes), {"fixed_sleep": [], "hpc_serve": []})
            for index in range(args.runs):  # interleaved, so drift affects both alike
                runs["fixed_sleep"].append(fixed_sleep(nodes, shared, env, vllm_python))
                runs["hpc_serve"].append(ours(nodes, shared, env, vllm_python))
                print(f"{nodes} nodes, run {index + 1}: fixed-sleep {runs['fixed_sleep'][-1]}, "
                      f"hpc-serve {runs['hpc_serve'][-1]}", flush=True)
    finally:
        localcluster.down()
    lines = [f"Median of {args.runs} interleaved runs per size on the local Slurm cluster, {GPUS} fake GPUs "
             "per node; `python benchmarks/ray_formation.py`.", "",
             "| nodes | fixed sleeps (baseline), s | nodes joined when its sleeps end | hpc-serve, s | "
             "ratio | every node and GPU verified |", "|---|---|---|---|---|---|"]
    ok = True
    for nodes, runs in results.items():
        base = statistics.median(r["seconds"] for r in runs["fixed_sleep"])
        mine = statistics.median(r["seconds"] for r in runs["hpc_serve"])
        joined = sorted({f"{r['joined']}/{nodes}" for r in runs["fixed_sleep"]})
        lines.append(f"| {nodes} | {base:.1f} | {', '.join(joined)} | {mine:.1f} | {mine / base:.2f} | yes |")
        ok = ok and mine < base
    text = "\n".join(lines) + "\n"
    write_results("ray_formation", text, {"runs": args.runs, "gpus_per_node": GPUS, "results": results})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
