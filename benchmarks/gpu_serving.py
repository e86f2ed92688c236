"""hpc-serve (mp and Ray launchers) against a hand-launched `vllm serve` on one real GPU.

Usage (on a GPU machine with vLLM and Ray; see docs/development.md, "The GPU tier"):
    python benchmarks/gpu_serving.py --model DIR --phase cold --out RESULTS_DIR
    python benchmarks/gpu_serving.py --model DIR --phase warm --out RESULTS_DIR [--rounds 5]
    python benchmarks/gpu_serving.py --report RESULTS_DIR        # -> benchmarks/results/gpu_serving.md

The baseline is what a user does instead: `vllm serve MODEL` by hand with vLLM's default caches,
with the same flags. Phase cold: each of the three starts once with an empty compile cache of its
own (hand: VLLM_CACHE_ROOT; hpc-serve: --cache-dir), alone on the GPU; READY = /health 200 and
/v1/models lists the model, measured from the start command (hpc-serve: from `submit`, the agent's
READY record). Phase warm: the three start again on those caches, one after the other, and stay up
side by side (each with --gpu-memory-utilization 0.28); then --rounds rounds, rotating which goes
first, of the same closed-loop load on each: --clients concurrent streaming completions of
--input random tokens in and --output tokens out (ignore_eos), --requests in all. Reported: medians
of output tokens/s (ratio to the hand-launched), of TTFT (difference), and READY cold and warm.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from hpc_serve.engine import serves  # noqa: E402

CLI = [sys.executable, "-m", "hpc_serve"]
VLLM = os.environ.get("HPC_SERVE_GPU_ENGINE_CMD", f"{sys.executable} -m vllm.entrypoints.cli.main serve")
RAY = os.environ.get("HPC_SERVE_GPU_RAY_CMD", f"{sys.executable} -m ray.scripts.scripts")
FLAGS = ["--max-model-len", "2048", "--gpu-memory-utilization", "0.28"]
VARIANTS = ("hand", "mp", "ray")


def gpu_memory_used_mib() -> int:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return sum(int(line) for line in out.split())


class Hand:
    """`vllm serve` started by hand, as a user would."""

    def __init__(self, model: str, cache: str, port: int) -> None:
        self.model, self.cache, self.port = model, cache, port
        self.url, self.key, self.popen = f"http://127.0.0.1:{port}", "", None

    def start(self, log: Path) -> float:
        started = time.time()
        env = {**os.environ, "VLLM_CACHE_ROOT": self.cache}
        self.popen = subprocess.Popen([*shlex.split(VLLM), self.model, "--host", "127.0.0.1", "--port",
                                       str(self.port), *FLAGS], env=env, stdout=log.open("ab"),
                                      stderr=subprocess.STDOUT, start_new_session=True)
        while not serves(self.url, self.model):
            if self.popen.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.popen.returncode}: see {log}")
            time.sleep(0.25)
        return time.time() - started

    def stop(self) -> None:
        if self.popen and self.popen.poll() is None:
            os.killpg(self.popen.pid, 15)
            self.popen.wait(60)


class HpcServe:
    """A deployment through `hpc-serve submit --executor local`."""

    def __init__(self, model: str, cache: str, launcher: str, home: str) -> None:
        self.model, self.cache, self.launcher = model, cache, launcher
        self.env = {**os.environ, "HPC_SERVE_HOME": home, "HPC_SERVE_PYTHON": sys.executable}
        self.job, self.url, self.key = "", "", ""

    def start(self, log: Path) -> float:
        asked = time.time()
        done = subprocess.run([*CLI, "submit", self.model, "--executor", "local", "--gpus-per-node", "1",
                               "--launcher", self.launcher, "--engine-cmd", VLLM, "--ray-cmd", RAY,
                               "--cache-dir", self.cache, "--timeout", "900", "--", *FLAGS],
                              env=self.env, capture_output=True, text=True)
        log.open("a").write(done.stdout + done.stderr)
        if done.returncode != 0:
            raise RuntimeError(f"hpc-serve submit failed: {done.stderr.strip()[-500:]}")
        self.job = done.stdout.split()[1]
        endpoint = json.loads(subprocess.run([*CLI, "endpoint", self.job, "--json"], env=self.env,
                                             capture_output=True, text=True, check=True).stdout)
        self.url = f"http://{endpoint['host']}:{endpoint['port']}"
        self.key = Path(endpoint["api_key_file"]).read_text().strip()
        state = json.loads(Path(self.env["HPC_SERVE_HOME"], "deployments", self.job, "state.json").read_text())
        ready = next(h["at"] for h in state["history"] if h["phase"] == "READY")
        return ready - asked

    def timings(self) -> dict:
        path = Path(self.env["HPC_SERVE_HOME"], "deployments", self.job, "timings", "0.json")
        return json.loads(path.read_text()) if path.exists() else {}

    def stop(self) -> None:
        if self.job:
            subprocess.run([*CLI, "cancel", self.job], env=self.env, capture_output=True)


async def one_request(url: str, key: str, model: str, prompt: list[int], output: int) -> float:
    """One streaming completion; the seconds to its first token."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": output, "ignore_eos": True,
                       "stream": True, "temperature": 0}).encode()
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{auth}"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head.encode() + body)
    first = None
    while line := await reader.readline():
        if first is None and line.startswith(b"data:") and b'"text"' in line:
            first = time.perf_counter() - start
        if line.strip() == b"data: [DONE]":
            break
    writer.close()
    return first if first is not None else time.perf_counter() - start


def load(server, model: str, clients: int, requests: int, inputs: int, output: int) -> dict:
    """Closed loop: ``clients`` streams until ``requests`` are done; output tokens/s, median TTFT."""
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 8000) for _ in range(inputs)] for _ in range(requests)]

    async def run() -> list[float]:
        queue: asyncio.Queue = asyncio.Queue()
        for prompt in prompts:
            queue.put_nowait(prompt)
        ttfts: list[float] = []

        async def client() -> None:
            while not queue.empty():
                ttfts.append(await one_request(server.url, server.key, model, queue.get_nowait(), output))

        await asyncio.gather(*(client() for _ in range(clients)))
        return ttfts

    start = time.perf_counter()
    ttfts = asyncio.run(run())
    seconds = time.perf_counter() - start
    return {"tokens_per_s": requests * output / seconds, "ttft_ms": statistics.median(ttfts) * 1000,
            "seconds": seconds}


def make(variant: str, model: str, cache: str, home: str):
    return Hand(model, cache, 28000) if variant == "hand" else HpcServe(model, cache, variant, home)


def phase(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    caches = {v: str(out / "caches" / v) for v in VARIANTS}
    home = tempfile.mkdtemp(prefix="bench-gpu-home-")
    log = out / f"{args.phase}.log"
    result: dict = {"phase": args.phase, "ready_s": {}, "timings": {}, "idle_mib": gpu_memory_used_mib()}
    if args.phase == "cold":
        for variant in args.variants:
            server = make(variant, args.model, caches[variant], home)
            try:
                result["ready_s"][variant] = server.start(log)
                result["timings"][variant] = server.timings() if variant != "hand" else {}
            finally:
                server.stop()
            print(f"cold {variant}: READY after {result['ready_s'][variant]:.1f} s", flush=True)
    else:
        servers = {}
        try:
            for variant in args.variants:
                servers[variant] = make(variant, args.model, caches[variant], home)
                result["ready_s"][variant] = servers[variant].start(log)
                result["timings"][variant] = servers[variant].timings() if variant != "hand" else {}
                print(f"warm {variant}: READY after {result['ready_s'][variant]:.1f} s", flush=True)
            for server in servers.values():  # warm-up: the first requests after a start are slow
                load(server, args.model, args.clients, args.clients, args.input, 8)
            result["rounds"] = []
            for index in range(args.rounds):
                names = tuple(servers)
                order = names[index % len(names):] + names[:index % len(names)]
                measured = {v: load(servers[v], args.model, args.clients, args.requests, args.input, args.output)
                            for v in order}
                result["rounds"].append(measured)
                print(f"round {index + 1}: " + "; ".join(f"{v} {m['tokens_per_s']:.0f} tok/s ttft "
                                                          f"{m['ttft_ms']:.1f} ms" for v, m in measured.items()),
                      flush=True)
        finally:
            for server in servers.values():
                server.stop()
    deadline = time.time() + 60
    while time.time() < deadline and gpu_memory_used_mib() > result["idle_mib"] + 64:
        time.sleep(1)
    result["after_mib"] = gpu_memory_used_mib()
    (out / f"gpu_serving-{args.phase}.json").write_text(json.dumps({"args": vars(args), **result}, indent=2))
    return result


def report(folder: Path) -> str:
    cold = json.loads((folder / "gpu_serving-cold.json").read_text())
    warm = json.loads((folder / "gpu_serving-warm.json").read_text())
    rounds = warm["rounds"]
    med = {v: statistics.median(r[v]["tokens_per_s"] for r in rounds) for v in VARIANTS}
    ratio = {v: statistics.median(r[v]["tokens_per_s"] / r["hand"]["tokens_per_s"] for r in rounds) for v in VARIANTS}
    ttft = {v: statistics.median(r[v]["ttft_ms"] - r["hand"]["ttft_ms"] for r in rounds) for v in VARIANTS}
    a = warm["args"]
    lines = [f"One NVIDIA H200, vLLM 0.24.0, Ray 2.60.0, a random-weight 0.3 B Qwen2, `{' '.join(FLAGS)}`; "
             f"{len(rounds)} rotating rounds of {a['requests']} streaming completions ({a['input']} tokens in, "
             f"{a['output']} out, ignore_eos) at {a['clients']} concurrent clients per server, medians.", "",
             "| server | output tokens/s | ratio | added TTFT | READY cold | READY warm |",
             "|---|---|---|---|---|---|"]
    names = {"hand": "`vllm serve` by hand (baseline)", "mp": "hpc-serve, mp launcher", "ray": "hpc-serve, Ray launcher"}
    for v in VARIANTS:
        lines.append(f"| {names[v]} | {med[v]:.0f} | {ratio[v]:.3f} | {ttft[v]:+.1f} ms | "
                     f"{cold['ready_s'][v]:.1f} s | {warm['ready_s'][v]:.1f} s |")
    lines += ["", "Targets: ratio >= 0.98, added TTFT <= 5 ms, warm READY <= the hand-launched warm start + 3 s, "
              "Ray READY <= mp READY + 10 s.",
              f"GPU memory in use before / after each phase: cold {cold['idle_mib']} / {cold['after_mib']} MiB, "
              f"warm {warm['idle_mib']} / {warm['after_mib']} MiB.", ""]
    for name, data in (("cold", cold), ("warm", warm)):
        for v in ("mp", "ray"):
            t = data["timings"].get(v) or {}
            if t.get("agent_start"):
                steps = ", ".join(f"{k} +{t[k] - t['agent_start']:.1f} s" for k in
                                  ("ray_head_up", "ray_formed", "vllm_started", "ready") if k in t)
                lines.append(f"- {name} {v}: from the agent's start: {steps}")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--phase", choices=("cold", "warm"))
    parser.add_argument("--out", default=str(HERE / "results" / "gpu"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=128)
    parser.add_argument("--requests", type=int, default=1200)
    parser.add_argument("--input", type=int, default=256)
    parser.add_argument("--output", type=int, default=128)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--report", metavar="DIR", help="combine DIR's two phases into results/gpu_serving.md")
    args = parser.parse_args()
    if args.report:
        text = report(Path(args.report))
        print(text)
        (HERE / "results" / "gpu_serving.md").write_text(text)
        return 0
    if not (args.model and args.phase):
        parser.error("--model and --phase are needed (or --report DIR)")
    phase(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
