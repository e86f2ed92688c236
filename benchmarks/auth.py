"""What the key on every path costs: vLLM with hpc-serve's middleware against vLLM's own key check.

Usage: python benchmarks/auth.py [--rounds 9] [--clients 16] [--requests 8]

Two real vLLM servers (CPU build, the tiny model, `--enforce-eager`) side by side on 127.0.0.1,
both on CPU 1 (`taskset`, `VLLM_CPU_OMP_THREADS_BIND=1`): the baseline as a user would start it
(VLLM_API_KEY: vLLM's own check, `/v1` only), and the same with
`--middleware hpc_serve_auth.KeyRequired` (HPC_SERVE_API_KEY, every path), as the node agent
starts it. The load
generator runs on CPU 0; each round sends the same streaming chat load (the tunnel benchmark's
generator) to one server, then the other, alternating which goes first, while the other idles.
Reported: medians over rounds of the throughput ratio (target >= 0.99) and of the added time to
first token (target <= 1 ms). Writes benchmarks/results/auth.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import write_results  # noqa: E402
from benchmarks.tunnel import load  # noqa: E402
from hpc_serve.demo.vllm_env import ensure_vllm_env  # noqa: E402
from hpc_serve.node.readiness import serves  # noqa: E402
from hpc_serve.vllm_auth import MIDDLEWARE, install  # noqa: E402


def start(vllm, port: int, key: str, folder: Path, middleware: bool) -> subprocess.Popen:
    env = {**os.environ, "VLLM_API_KEY" if not middleware else "HPC_SERVE_API_KEY": key, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "1",
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "PYTHONPATH": install(str(folder / "py"))}
    argv = ["taskset", "-c", "1", *shlex.split(vllm.engine_cmd), vllm.model, "--host", "127.0.0.1", "--port",
            str(port), "--max-model-len", "512", "--enforce-eager"] + (["--middleware", MIDDLEWARE] if middleware else [])
    log = open(folder / f"vllm-{port}.log", "wb")
    return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def middleware_cost_us(calls: int = 200_000) -> float:
    """Microseconds the middleware adds to one request, in process (no server, no noise): the
    same request through KeyRequired and straight to the app, the difference per call."""
    import asyncio

    os.environ["HPC_SERVE_API_KEY"] = "k" * 64
    from hpc_serve.vllm_auth import KeyRequired

    async def app(scope, receive, send):
        return None

    guarded = KeyRequired(app)
    scope = {"type": "http", "path": "/v1/chat/completions",
             "headers": [(b"host", b"x"), (b"content-type", b"application/json"),
                         (b"authorization", b"Bearer " + b"k" * 64)]}

    async def run(handler) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            await handler(scope, None, None)
        return time.perf_counter() - start

    plain, through = asyncio.run(run(app)), asyncio.run(run(guarded))
    return (through - plain) / calls * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="even, so each server goes first equally often")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=8)
    args = parser.parse_args()
    vllm = ensure_vllm_env(print)
    folder = Path(tempfile.mkdtemp(prefix="bench-auth-"))
    key = secrets.token_hex(32)
    servers = {"vllm's own key check": 28101, "with the middleware": 28102}
    processes = []
    rounds = []
    try:
        for name, port in servers.items():  # one after the other: starts are CPU-bound
            processes.append(start(vllm, port, key, folder, middleware=name == "with the middleware"))
            deadline = time.monotonic() + 300
            while not serves(f"http://127.0.0.1:{port}", vllm.model, {"Authorization": f"Bearer {key}"}):
                if processes[-1].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"vLLM on {port} did not start: see {folder}")
                time.sleep(0.5)
        os.sched_setaffinity(0, {0})
        urls = {name: f"http://127.0.0.1:{port}/v1" for name, port in servers.items()}
        for url in urls.values():
            load(url, key, vllm.model, args.clients, 1)  # warm-up
        names = list(urls)
        for index in range(args.rounds):
            measured = {name: load(urls[name], key, vllm.model, args.clients, args.requests)
                        for name in (names if index % 2 == 0 else names[::-1])}
            rounds.append(measured)
            print(f"round {index + 1}: " + "; ".join(f"{n} {m[0]:.2f} req/s ttft {m[1] * 1000:.1f} ms"
                                                      for n, m in measured.items()), flush=True)
    finally:
        for process in processes:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(30)
    cost_us = middleware_cost_us()
    base, guarded = names
    ratio = statistics.median(r[guarded][0] / r[base][0] for r in rounds)
    added = statistics.median((r[guarded][1] - r[base][1]) * 1000 for r in rounds)
    text = "\n".join([
        f"Median of {args.rounds} alternating rounds; each round {args.clients} concurrent clients x "
        f"{args.requests} streaming chat requests (16 tokens) per server; two vLLM CPU servers side by side "
        "on CPU 1, the load generator on CPU 0; `python benchmarks/auth.py`.", "",
        "| server | throughput (req/s) | ratio | target |", "|---|---|---|---|",
        f"| vLLM's own key check, `/v1` only (baseline) | {statistics.median(r[base][0] for r in rounds):.2f} | 1.00 | |",
        f"| with `--middleware hpc_serve_auth.KeyRequired`, every path | "
        f"{statistics.median(r[guarded][0] for r in rounds):.2f} | {ratio:.3f} | >= 0.99 |", "",
        f"Added median time to first token: {added:+.2f} ms (target <= 1 ms).", "",
        f"The middleware's own cost, measured in process (200,000 calls, no server): {cost_us:.2f} us per "
        "request; it does not touch the response stream.", ""])
    write_results("auth", text, {"args": vars(args), "rounds": rounds, "middleware_us_per_request": cost_us})
    return 0 if ratio >= 0.99 and added <= 1 else 1


if __name__ == "__main__":
    sys.exit(main())
