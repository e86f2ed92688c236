"""CLI start-up and planning speed (issue: `--help` and `render` <= 0.20 s, `plan` < 50 ms).

Usage: python benchmarks/cli_speed.py [--runs N] [--peer PATH-TO-vec-inf]
Prints medians and ratios against a baseline measured in the same run (a bare `python -c pass`,
and vec-inf's `--help` when --peer is given), and writes benchmarks/results/cli_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RENDER = ["render", "Qwen/Qwen2.5-7B-Instruct", "--nodes", "2", "--tp", "8", "--pp", "2"]


def wall(argv: list[str], runs: int) -> float:
    """Median wall time of ``argv`` in seconds (one warm-up run first)."""
    subprocess.run(argv, capture_output=True, check=True)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def plan_ms(nodes: int, runs: int, launcher: str = "auto") -> float:
    """Median in-process time of validating a spec and planning ``nodes`` nodes, in ms.

    The default launcher is Ray (TP=8, PP up to 4, DP across the rest); ``mp`` gives every node
    its own vLLM command line (DP=nodes), the most per-node work a plan does.
    """
    from hpc_serve.planner.launch import make_plan
    from hpc_serve.planner.spec import build_spec

    times = []
    for _ in range(runs):
        start = time.perf_counter()
        if launcher == "mp":
            make_plan(build_spec(model="org/m", gpus_per_node=8, nodes=nodes, tp=8, launcher="mp"))
        else:
            make_plan(build_spec(model="org/m", gpus_per_node=8, nodes=nodes, tp=8, pp=min(nodes, 4)))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--peer", help="path of vec-inf's console script, to measure it in the same run")
    args = parser.parse_args()
    cli = shutil.which("hpc-serve", path=str(Path(sys.executable).parent)) or "hpc-serve"
    env_note = f"{os.cpu_count()} cores, Python {sys.version.split()[0]}"
    rows = {
        "python -c pass (baseline)": wall([sys.executable, "-c", "pass"], args.runs),
        "hpc-serve --help": wall([cli, "--help"], args.runs),
        "hpc-serve render (2 nodes, tp=8, pp=2)": wall([cli, *RENDER], args.runs),
    }
    if args.peer:
        rows["vec-inf --help (peer)"] = wall([args.peer, "--help"], args.runs)
    planning = {f"plan {n} nodes (ray)": plan_ms(n, args.runs) for n in (1, 64, 4096)}
    planning["plan 4096 nodes (mp, dp=4096)"] = plan_ms(4096, args.runs, "mp")
    base = rows["python -c pass (baseline)"]
    peer = rows.get("vec-inf --help (peer)")
    lines = [f"Median of {args.runs} runs ({env_note}); `python benchmarks/cli_speed.py"
             + (" --peer vec-inf" if peer else "") + "`.", "",
             "| command | median (s) | x bare python | x vec-inf --help | target |",
             "|---|---|---|---|---|"]
    for name, seconds in rows.items():
        target = "<= 0.20 s" if name.startswith("hpc-serve") else ""
        vs_peer = f"{seconds / peer:.2f}" if peer else "n/a"
        lines.append(f"| {name} | {seconds:.3f} | {seconds / base:.1f} | {vs_peer} | {target} |")
    lines += ["", "| planning (validate + plan, in process) | median (ms) | target |", "|---|---|---|"]
    lines += [f"| {name} | {ms:.2f} | < 50 ms |" for name, ms in planning.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "cli_speed.md").write_text(text)
    (out / "cli_speed.json").write_text(json.dumps(
        {"runs": args.runs, "machine": env_note, "seconds": rows, "plan_ms": planning}, indent=2) + "\n")
    ok = all(s <= 0.20 for n, s in rows.items() if n.startswith("hpc-serve")) and \
        all(ms < 50 for ms in planning.values())
    print("targets met" if ok else "TARGET MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
