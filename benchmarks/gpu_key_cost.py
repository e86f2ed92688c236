"""Where the mp launcher's throughput goes on one GPU: `vllm serve` by hand, the same with hpc-serve's
key middleware, and hpc-serve's mp launcher, side by side on one GPU, short rounds interleaved.

Usage (on a GPU machine; see docs/development.md, "The GPU tier"):
    python benchmarks/gpu_key_cost.py --model DIR --out RESULTS_DIR [--rounds 15 --requests 600]
    python benchmarks/gpu_key_cost.py --report RESULTS_DIR   # -> benchmarks/results/gpu_key_cost.{md,json}

The three share one compile cache (they have the same vLLM compile-cache hash), so the first, the
hand-launched server, starts cold and the other two warm: READY of `hand+key` against `mp` is a warm
start against a warm start on one machine. Then --rounds rounds rotating which goes first; each
server per round: the low-load TTFT probe and the closed-loop load of benchmarks/gpu_serving.py.
Reported: medians of the per-round ratios of output tokens/s to the hand-launched and of the added
probe TTFT, and, for each server, what its API server process runs with (CPU affinity, nice,
threads, environment names that differ from the hand-launched server's: values of keys never).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_serving import (FLAGS, HERE, Hand, HpcServe, add_load_arguments, finish,  # noqa: E402
                         gpu_memory_used_mib, one_round, warm_up, write_report)

MIDDLEWARE = HERE.parent / "hpc_serve" / "vllm_auth.py"
NAMES = {"hand": "`vllm serve` by hand (baseline)", "hand+key": "the same + hpc-serve's key middleware",
         "mp": "hpc-serve, mp launcher"}


class KeyedHand(Hand):
    """`vllm serve` by hand with hpc-serve's middleware and a key, as the node agent starts it."""

    def __init__(self, model: str, cache: str, port: int, out: Path) -> None:
        super().__init__(model, cache, port, out, "key", "hand-key")
        folder = Path(tempfile.mkdtemp(prefix="bench-key-"))
        shutil.copy(MIDDLEWARE, folder / "hpc_serve_auth.py")
        self.key = secrets.token_urlsafe(24)
        path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH")) if p)
        self.env = {"HPC_SERVE_API_KEY": self.key, "PYTHONPATH": path}
        self.args = ["--middleware", "hpc_serve_auth.KeyRequired"]


def api_process(port: int) -> int | None:
    """The pid of the `vllm serve` that was given ``port``."""
    for entry in sorted((e for e in os.listdir("/proc") if e.isdigit()), key=int):  # the parent first
        try:
            argv = Path("/proc", entry, "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in argv and str(port).encode() in argv and b"--port" in argv:
            return int(entry)
    return None


def how_it_runs(pid: int | None) -> dict:
    """CPU affinity, nice, threads and environment of a process and its children (names only).
    What this machine's /proc (gVisor or a VM) does not give is left out, never a failed run."""
    if pid is None:
        return {}

    def status_of(p) -> dict:
        try:
            text = Path("/proc", str(p), "status").read_text()
        except OSError:  # gone meanwhile
            return {}
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

    info: dict = {}
    try:
        status = status_of(pid)
        if not status:
            return {"error": f"no /proc/{pid}/status"}
        info["cpus_allowed"] = status.get("Cpus_allowed_list", "?").strip()
        info["threads"] = int(status.get("Threads", "0"))
        info["nice"] = int(Path("/proc", str(pid), "stat").read_text().rsplit(")", 1)[1].split()[16])
        info["environ"] = dict(item.split("=", 1) for item in Path("/proc", str(pid), "environ").read_bytes()
                               .decode(errors="replace").split("\0") if "=" in item)
        children = [e for e in os.listdir("/proc") if e.isdigit() and status_of(e).get("PPid", "").strip() == str(pid)]
        info["children"] = {c: status_of(c).get("Cpus_allowed_list", "?").strip() for c in children}
    except (OSError, ValueError, IndexError) as error:
        info["error"] = repr(error)
    return info


def shown(name: str, value: str) -> str:
    """A value worth keeping: never a key's, nor a path of the machine."""
    hidden = any(word in name for word in ("KEY", "TOKEN", "SECRET", "PASSWORD")) or "/" in value
    return "<not kept>" if hidden else value


def compare_environments(runs: dict) -> dict:
    """For each server: what differs from the hand-launched server's environment."""
    base = runs.get("hand", {}).get("environ", {})
    out = {}
    for name, info in runs.items():
        env = info.get("environ", {})
        changed = {k: shown(k, v) for k, v in env.items() if base.get(k) != v}
        out[name] = {"added_or_changed": changed, "removed": sorted(set(base) - set(env))}
    return out


def measure(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache, home = str(out / "cache"), tempfile.mkdtemp(prefix="bench-gpu-home-")
    servers = {"hand": Hand(args.model, cache, 28000, out, "key"), "hand+key": KeyedHand(args.model, cache, 28001, out),
               "mp": HpcServe(args.model, cache, "mp", home, out, "key")}
    result: dict = {"args": vars(args), "ready_s": {}, "idle_mib": gpu_memory_used_mib(), "rounds": [],
                    "complete": False}
    target = out / "gpu_key_cost.json"

    def save() -> None:
        target.write_text(json.dumps(result, indent=2))

    runs: dict = {}
    try:
        for name, server in servers.items():
            result["ready_s"][name] = server.start()
            port = int(server.url.rsplit(":", 1)[1])
            runs[name] = how_it_runs(api_process(port))
            print(f"{name}: READY after {result['ready_s'][name]:.1f} s", flush=True)
        result["processes"] = {n: {k: v for k, v in r.items() if k != "environ"} for n, r in runs.items()}
        result["environment"] = compare_environments(runs)
        save()
        warm_up(servers, args)
        for index in range(args.rounds):
            measured = one_round(servers, args, index)
            result["rounds"].append(measured)
            save()
            base = measured["hand"]
            print(f"round {index + 1}: " + "; ".join(
                f"{n} {m['tokens_per_s']:.0f} tok/s ({m['tokens_per_s'] / base['tokens_per_s']:.3f}), probe "
                f"{m['probe_ttft_ms']:.2f} ms" for n, m in measured.items()), flush=True)
    finally:
        for server in servers.values():
            server.stop()
    finish(result, save)


def report(folder: Path) -> tuple[str, dict]:
    data = json.loads((folder / "gpu_key_cost.json").read_text())
    rounds, a = data["rounds"], data["args"]
    med = statistics.median
    ratio = {n: med(r[n]["tokens_per_s"] / r["hand"]["tokens_per_s"] for r in rounds) for n in NAMES}
    added = {n: med(r[n]["probe_ttft_ms"] - r["hand"]["probe_ttft_ms"] for r in rounds) for n in NAMES}
    lines = [f"One NVIDIA H200, vLLM 0.24.0, a random-weight 0.29 B Qwen2, `{' '.join(FLAGS)}`, three servers side "
             f"by side sharing one compile cache. {len(rounds)} rounds rotating which goes first; per round and "
             f"server: {a['probe']} sequential streaming completions (1 client, {a['input']} tokens in, 4 out), "
             f"then {a['requests']} streaming completions ({a['input']} in, {a['output']} out, ignore_eos) at "
             f"{a['clients']} concurrent clients. Medians of per-round values. Command: `python "
             f"benchmarks/gpu_key_cost.py --model DIR --out R --rounds {a['rounds']} --requests {a['requests']}`, "
             "then `--report R`.", "",
             "| server | output tokens/s (median) | ratio to hand | added probe TTFT | READY |", "|---|---|---|---|---|"]
    for n, title in NAMES.items():
        tps = med(r[n]["tokens_per_s"] for r in rounds)
        lines.append(f"| {title} | {tps:.0f} | {ratio[n]:.3f} | {added[n]:+.2f} ms | {data['ready_s'][n]:.1f} s"
                     f"{' (cold)' if n == 'hand' else ' (warm)'} |")
    lines += ["", "Per round, ratio to the hand-launched server (order in brackets):", ""]
    for i, r in enumerate(rounds):
        lines.append(f"- {i + 1} ({' > '.join(r)}): hand {r['hand']['tokens_per_s']:.0f} tok/s; " + ", ".join(
            f"{n} {r[n]['tokens_per_s'] / r['hand']['tokens_per_s']:.3f}" for n in NAMES if n != "hand"))
    lines += ["", "How each API server process ran:", ""]
    for n, info in data.get("processes", {}).items():
        env = data["environment"].get(n, {})
        lines.append(f"- {n}: CPUs {info.get('cpus_allowed')}, nice {info.get('nice')}, {info.get('threads')} "
                     f"threads, children's CPUs {sorted(set(info.get('children', {}).values()))}; environment "
                     f"added or changed: {', '.join(sorted(env.get('added_or_changed', {}))) or 'none'}")
    notes = folder / "notes.md"
    if notes.exists():
        lines += ["", notes.read_text().strip()]
    return "\n".join(lines) + "\n", {"summary": {"ratio": ratio, "added_probe_ttft_ms": added}, **data}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--out")
    add_load_arguments(parser, rounds=15, requests=600)
    parser.add_argument("--report", metavar="DIR")
    args = parser.parse_args()
    if args.report:
        return write_report("gpu_key_cost", *report(Path(args.report)))
    if not (args.model and args.out):
        parser.error("--model and --out are needed (or --report DIR)")
    started = time.time()
    measure(args)
    print(f"done in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
