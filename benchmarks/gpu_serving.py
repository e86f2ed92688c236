"""hpc-serve (mp and Ray launchers) against a hand-launched `vllm serve` on one real GPU.

Usage (on a GPU machine with vLLM and Ray; see docs/development.md, "The GPU tier"):
    python benchmarks/gpu_serving.py --model DIR --phase cold --out RESULTS_DIR
    python benchmarks/gpu_serving.py --model DIR --phase warm --out RESULTS_DIR [--rounds 9]
    python benchmarks/gpu_serving.py --report RESULTS_DIR   # -> benchmarks/results/gpu_serving.{md,json}
                                              # (RESULTS_DIR/notes.md, if any, is appended to the .md)

The baseline is what a user does instead: `vllm serve MODEL` by hand with vLLM's default caches,
with the same flags. Phase cold: each of the three starts once with an empty compile cache of its
own (hand: VLLM_CACHE_ROOT; hpc-serve: --cache-dir), alone on the GPU; READY = /health 200 and
/v1/models lists the model, measured from the start command (hpc-serve: from `submit`, the agent's
READY record). Phase warm (same --out: it reuses the cold phase's caches): the three start again,
one after the other, and stay up side by side (each with --gpu-memory-utilization 0.28); then
--rounds rounds, rotating which goes first. Each round, for each server in turn: a low-load TTFT
probe (1 client, --probe sequential streaming completions, --input random tokens in, 4 out; the
median TTFT: what our path adds to a request), then the closed-loop load (--clients concurrent
streaming completions, --input random tokens in, --output out, ignore_eos, --requests in all;
output tokens/s and the median TTFT under load, which is mostly queueing). Prompts differ from
round to round (no prefix-cache hits across rounds) and are the same for every server within one.
Reported: medians over rounds of the per-round ratio of output tokens/s to the hand-launched, of the
per-round TTFT differences, and READY cold and warm. The phase's JSON is rewritten after every
start and every round, so a run stopped by a time limit still leaves its data.

Self-contained on purpose (no hpc_serve import): it drives hpc-serve only through its CLI,
`python -m hpc_serve`.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import http.client
import json
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLI = [sys.executable, "-m", "hpc_serve"]
VLLM = os.environ.get("HPC_SERVE_GPU_ENGINE_CMD", f"{sys.executable} -m vllm.entrypoints.cli.main serve")
RAY = os.environ.get("HPC_SERVE_GPU_RAY_CMD", f"{sys.executable} -m ray.scripts.scripts")
FLAGS = ["--max-model-len", "2048", "--gpu-memory-utilization", "0.28"]
VARIANTS = ("hand", "mp", "ray")
NAMES = {"hand": "`vllm serve` by hand (baseline)", "mp": "hpc-serve, mp launcher", "ray": "hpc-serve, Ray launcher"}


def serves(url: str, model: str, key: str = "") -> bool:
    """GET /health is 200 and GET /v1/models lists ``model`` (1 s timeouts)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{url}/health", headers=headers), timeout=1) as got:
            if got.status != 200:
                return False
        with urllib.request.urlopen(urllib.request.Request(f"{url}/v1/models", headers=headers), timeout=1) as got:
            return model in [m.get("id") for m in json.load(got).get("data", [])]
    except (OSError, ValueError, http.client.HTTPException):
        return False


def gpu_memory_used_mib() -> int:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return sum(int(line) for line in out.split())


def wait_free(idle_mib: int, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline and gpu_memory_used_mib() > idle_mib + 64:
        time.sleep(1)


class Hand:
    """`vllm serve` started by hand, as a user would."""

    def __init__(self, model: str, cache: str, port: int, out: Path, phase: str, name: str = "hand") -> None:
        self.model, self.cache, self.port = model, cache, port
        self.url, self.key, self.popen = f"http://127.0.0.1:{port}", "", None
        self.log = out / f"{phase}-{name}.log"
        self.env: dict[str, str] = {}  # added to the environment (a subclass may add to both)
        self.args: list[str] = []  # added to the command line

    def start(self) -> float:
        started = time.time()
        env = {**os.environ, "VLLM_CACHE_ROOT": self.cache, **self.env}
        self.popen = subprocess.Popen([*shlex.split(VLLM), self.model, "--host", "127.0.0.1", "--port",
                                       str(self.port), *FLAGS, *self.args], env=env, stdout=self.log.open("ab"),
                                      stderr=subprocess.STDOUT, start_new_session=True)
        while not serves(self.url, self.model, self.key):
            if self.popen.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.popen.returncode}: see {self.log}")
            time.sleep(0.25)
        return time.time() - started

    def timings(self) -> dict:
        return {}

    def stop(self) -> None:
        if self.popen and self.popen.poll() is None:
            os.killpg(self.popen.pid, 15)
            self.popen.wait(60)


class HpcServe:
    """A deployment through `hpc-serve submit --executor local`."""

    def __init__(self, model: str, cache: str, launcher: str, home: str, out: Path, phase: str) -> None:
        self.model, self.cache, self.launcher, self.out, self.phase = model, cache, launcher, out, phase
        self.env = {**os.environ, "HPC_SERVE_HOME": home, "HPC_SERVE_PYTHON": sys.executable}
        self.job, self.url, self.key = "", "", ""

    def _dep(self) -> Path:
        return Path(self.env["HPC_SERVE_HOME"], "deployments", self.job)

    def start(self) -> float:
        asked = time.time()
        done = subprocess.run([*CLI, "submit", self.model, "--executor", "local", "--gpus-per-node", "1",
                               "--launcher", self.launcher, "--engine-cmd", VLLM, "--ray-cmd", RAY,
                               "--cache-dir", self.cache, "--timeout", "900", "--", *FLAGS],
                              env=self.env, capture_output=True, text=True)
        with (self.out / f"{self.phase}-submit.log").open("a") as log:
            log.write(f"== {self.launcher}\n{done.stdout}{done.stderr}")
        if done.returncode != 0:
            raise RuntimeError(f"hpc-serve submit failed: {done.stderr.strip()[-500:]}")
        self.job = done.stdout.split()[1]
        endpoint = json.loads(subprocess.run([*CLI, "endpoint", self.job, "--json"], env=self.env,
                                             capture_output=True, text=True, check=True).stdout)
        self.url = f"http://{endpoint['host']}:{endpoint['port']}"
        self.key = Path(endpoint["api_key_file"]).read_text().strip()
        state = json.loads((self._dep() / "state.json").read_text())
        ready = next(h["at"] for h in state["history"] if h["phase"] == "READY")
        return ready - asked

    def timings(self) -> dict:
        path = self._dep() / "timings" / "0.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def stop(self) -> None:
        if not self.job:
            return
        if self.launcher == "ray":  # Ray's own logs live in the job's temp folder, removed on cancel
            for logs in glob.glob(f"/tmp/hs-{self.job}/ray/session_latest/logs"):
                shutil.copytree(logs, self.out / f"{self.phase}-ray-session", dirs_exist_ok=True,
                                ignore_dangling_symlinks=True)
        subprocess.run([*CLI, "cancel", self.job], env=self.env, capture_output=True)
        node_log = self._dep() / "logs" / "node-0.log"
        if node_log.exists():
            shutil.copy(node_log, self.out / f"{self.phase}-{self.launcher}-node.log")


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


def prompts(seed: int, count: int, tokens: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, 8000) for _ in range(tokens)] for _ in range(count)]


def load(server, model: str, clients: int, batch: list[list[int]], output: int) -> dict:
    """Closed loop: ``clients`` streams until every prompt is done; output tokens/s, median TTFT."""

    async def run() -> list[float]:
        queue: asyncio.Queue = asyncio.Queue()
        for prompt in batch:
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
    return {"tokens_per_s": len(batch) * output / seconds, "ttft_ms": statistics.median(ttfts) * 1000,
            "seconds": seconds}


def probe(server, model: str, batch: list[list[int]]) -> dict:
    """Low load: one client, sequential streaming completions of 4 tokens; median TTFT."""

    async def run() -> list[float]:
        return [await one_request(server.url, server.key, model, prompt, 4) for prompt in batch]

    ttfts = [t * 1000 for t in asyncio.run(run())]
    return {"probe_ttft_ms": statistics.median(ttfts), "probe_ttft_all_ms": [round(t, 2) for t in ttfts]}


def warm_up(servers: dict, args) -> None:
    """A few requests to each server: the first requests after a start are slow."""
    for server in servers.values():
        load(server, args.model, args.clients, prompts(999, args.clients, args.input), 8)
        probe(server, args.model, prompts(998, 4, args.input))


def one_round(servers: dict, args, index: int) -> dict:
    """Round ``index``: each server in turn (the order rotates), the probe then the load, the same
    prompts for all (new ones each round: no prefix-cache hits across rounds)."""
    names = tuple(servers)
    order = names[index % len(names):] + names[:index % len(names)]
    batch = prompts(index, args.requests, args.input)
    few = prompts(10_000 + index, args.probe, args.input)
    measured = {}
    for name in order:
        measured[name] = probe(servers[name], args.model, few)
        measured[name].update(load(servers[name], args.model, args.clients, batch, args.output))
    return measured


def finish(result: dict, save) -> None:
    """After the servers stopped: wait for the GPU memory to be free again, record it, save."""
    wait_free(result["idle_mib"])
    result["after_mib"] = gpu_memory_used_mib()
    result["complete"] = True
    save()


def make(variant: str, model: str, cache: str, home: str, out: Path, phase: str):
    return Hand(model, cache, 28000, out, phase) if variant == "hand" else HpcServe(model, cache, variant, home, out, phase)


def ratios(measured: dict) -> str:
    base = measured.get("hand")
    if not base:
        return ""
    return "; ".join(f"{v}/hand {m['tokens_per_s'] / base['tokens_per_s']:.3f}, probe TTFT "
                     f"{m['probe_ttft_ms'] - base['probe_ttft_ms']:+.2f} ms"
                     for v, m in measured.items() if v != "hand")


def phase(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    caches = {v: str(out / "caches" / v) for v in VARIANTS}
    home = tempfile.mkdtemp(prefix="bench-gpu-home-")
    result: dict = {"phase": args.phase, "ready_s": {}, "timings": {}, "idle_mib": gpu_memory_used_mib(),
                    "started_at": time.time(), "complete": False}
    target = out / f"gpu_serving-{args.phase}.json"

    def save() -> None:
        target.write_text(json.dumps({"args": vars(args), **result}, indent=2))

    if args.phase == "cold":
        for variant in args.variants:
            server = make(variant, args.model, caches[variant], home, out, "cold")
            try:
                result["ready_s"][variant] = server.start()
                result["timings"][variant] = server.timings()
            finally:
                server.stop()
                wait_free(result["idle_mib"])
            print(f"cold {variant}: READY after {result['ready_s'][variant]:.1f} s", flush=True)
            save()
    else:
        servers = {}
        try:
            for variant in args.variants:
                servers[variant] = make(variant, args.model, caches[variant], home, out, "warm")
                result["ready_s"][variant] = servers[variant].start()
                result["timings"][variant] = servers[variant].timings()
                print(f"warm {variant}: READY after {result['ready_s'][variant]:.1f} s", flush=True)
                save()
            warm_up(servers, args)
            result["rounds"] = []
            for index in range(args.rounds):
                measured = one_round(servers, args, index)
                result["rounds"].append(measured)
                save()
                print(f"round {index + 1}: " + "; ".join(
                    f"{v} {m['tokens_per_s']:.0f} tok/s, ttft {m['ttft_ms']:.1f} ms, probe {m['probe_ttft_ms']:.2f} ms"
                    for v, m in measured.items()) + f" | {ratios(measured)}", flush=True)
        finally:
            for server in servers.values():
                server.stop()
    finish(result, save)
    return result


def med(values) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def summary(cold: dict, warm: dict) -> dict:
    rounds = warm.get("rounds", [])
    full = [r for r in rounds if all(v in r for v in VARIANTS)]
    per_round = {v: [{"tokens_per_s_ratio": r[v]["tokens_per_s"] / r["hand"]["tokens_per_s"],
                      "added_ttft_ms": r[v]["probe_ttft_ms"] - r["hand"]["probe_ttft_ms"],
                      "added_ttft_under_load_ms": r[v]["ttft_ms"] - r["hand"]["ttft_ms"],
                      "first": next(iter(r)) == v} for r in full] for v in VARIANTS}
    return {
        "rounds": len(full),
        "tokens_per_s": {v: med(r[v]["tokens_per_s"] for r in full) for v in VARIANTS},
        "tokens_per_s_range": {v: [min(r[v]["tokens_per_s"] for r in full), max(r[v]["tokens_per_s"] for r in full)]
                               for v in VARIANTS} if full else {},
        "ratio": {v: med(p["tokens_per_s_ratio"] for p in per_round[v]) for v in VARIANTS},
        "probe_ttft_ms": {v: med(r[v]["probe_ttft_ms"] for r in full) for v in VARIANTS},
        "added_ttft_ms": {v: med(p["added_ttft_ms"] for p in per_round[v]) for v in VARIANTS},
        "ttft_under_load_ms": {v: med(r[v]["ttft_ms"] for r in full) for v in VARIANTS},
        "added_ttft_under_load_ms": {v: med(p["added_ttft_under_load_ms"] for p in per_round[v]) for v in VARIANTS},
        "ready_cold_s": cold.get("ready_s", {}), "ready_warm_s": warm.get("ready_s", {}),
        "per_round": per_round,
    }


def report(folder: Path) -> tuple[str, dict]:
    cold = json.loads((folder / "gpu_serving-cold.json").read_text())
    warm = json.loads((folder / "gpu_serving-warm.json").read_text())
    s = summary(cold, warm)
    a = warm["args"]
    rc, rw = s["ready_cold_s"], s["ready_warm_s"]
    # DIR/notes.json: what the run cannot know: {"machines": {"cold": "A", "warm": "B"}, "not_warm": ["ray"]}
    extra = json.loads((folder / "notes.json").read_text()) if (folder / "notes.json").exists() else {}
    machine = {k: f" (machine {m})" for k, m in extra.get("machines", {}).items()}

    def fmt(d: dict, v: str, phase_: str) -> str:
        if v not in d:
            return "not measured"
        if phase_ == "warm" and v in extra.get("not_warm", ()):
            return f"not measured ({d[v]:.1f} s: compile-cache miss)"
        return f"{d[v]:.1f} s"
    lines = [f"One NVIDIA H200, vLLM 0.24.0, Ray 2.60.0, a random-weight 0.29 B Qwen2 (`benchmarks/gpu_model.py`), "
             f"`{' '.join(FLAGS)}`, three servers side by side on the GPU, measured in turn. {s['rounds']} rounds "
             f"(rotating which server goes first), each server per round: a low-load TTFT probe ({a['probe']} "
             f"sequential streaming completions, {a['input']} random tokens in, 4 out, one client), then "
             f"{a['requests']} streaming completions ({a['input']} tokens in, {a['output']} out, ignore_eos) at "
             f"{a['clients']} concurrent clients. Medians over rounds; ratio and TTFT differences are medians of "
             f"the per-round values. Commands: `python benchmarks/gpu_serving.py --model DIR --phase cold --out R`, "
             f"`... --phase warm --out R --rounds {a['rounds']} --requests {a['requests']}`, `... --report R`.", "",
             "| server | output tokens/s | ratio | added TTFT (1 client) | TTFT under load (128 streams) "
             f"| READY cold{machine.get('cold', '')} | READY warm{machine.get('warm', '')} |", "|---|---|---|---|---|---|---|"]
    for v in VARIANTS:
        added = "" if v == "hand" else f"{s['added_ttft_ms'][v]:+.2f} ms"
        load_ = f"{s['ttft_under_load_ms'][v]:.0f} ms" + ("" if v == "hand" else f" ({s['added_ttft_under_load_ms'][v]:+.0f})")
        lines.append(f"| {NAMES[v]} | {s['tokens_per_s'][v]:.0f} | {s['ratio'][v]:.3f} | {added} "
                     f"(probe {s['probe_ttft_ms'][v]:.2f} ms) | {load_} | {fmt(rc, v, 'cold')} | {fmt(rw, v, 'warm')} |")
    if not warm.get("complete"):
        lines += ["", f"The warm phase was stopped (time limit) after {s['rounds']} of {a['rounds']} rounds; "
                      "its JSON is the one written after the last finished round."]
    full = [r for r in warm.get("rounds", []) if all(v in r for v in VARIANTS)]
    lines += ["", "Per round (order; hand-launched output tokens/s; ratio of output tokens/s to the hand-launched; "
                  "added probe TTFT):", "",
              "| round | order | hand tokens/s | " + " | ".join(f"{v} ratio | {v} added TTFT" for v in ("mp", "ray")) + " |",
              "|---|---|---|---|---|---|---|"]
    for i in range(s["rounds"]):
        cells = [" > ".join(full[i]), f"{full[i]['hand']['tokens_per_s']:.0f}"]
        for v in ("mp", "ray"):
            p = s["per_round"][v][i]
            cells += [f"{p['tokens_per_s_ratio']:.3f}", f"{p['added_ttft_ms']:+.2f} ms"]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    if s["rounds"]:
        rng = s["tokens_per_s_range"]
        lines += ["", "Output tokens/s range over rounds: " + ", ".join(
            f"{v} {rng[v][0]:.0f}-{rng[v][1]:.0f} ({(rng[v][1] / rng[v][0] - 1) * 100:.0f} %)" for v in VARIANTS) + "."]
    lines += ["", "Targets: ratio >= 0.98, added TTFT <= 5 ms, warm READY <= the hand-launched warm start + 3 s, "
              "Ray READY <= mp READY + 10 s.",
              f"GPU memory in use before / after each phase: cold {cold['idle_mib']} / {cold.get('after_mib')} MiB, "
              f"warm {warm['idle_mib']} / {warm.get('after_mib', 'not read (stopped)')} MiB.", ""]
    for name, data in (("cold", cold), ("warm", warm)):
        for v in ("mp", "ray"):
            t = data["timings"].get(v) or {}
            if t.get("agent_start"):
                steps = ", ".join(f"{k} +{t[k] - t['agent_start']:.1f} s" for k in
                                  ("ray_head_up", "ray_formed", "vllm_started", "ready") if k in t)
                lines.append(f"- {name} {v}: from the agent's start: {steps}")
    notes = folder / "notes.md"  # what the run itself cannot know (machines, shortcuts), kept beside its data
    if notes.exists():
        lines += ["", notes.read_text().strip()]
    combined = {"device": "1x NVIDIA H200, vLLM 0.24.0, Ray 2.60.0, random-weight Qwen2 0.29 B",
                "notes": extra, "summary": s, "cold": cold, "warm": warm}
    return "\n".join(lines) + "\n", combined


def add_load_arguments(parser: argparse.ArgumentParser, rounds: int, requests: int) -> None:
    """The load's flags, shared by the GPU benchmarks: rounds, clients, requests, probe, lengths."""
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--clients", type=int, default=128)
    parser.add_argument("--requests", type=int, default=requests)
    parser.add_argument("--probe", type=int, default=32, help="sequential requests of the low-load TTFT probe")
    parser.add_argument("--input", type=int, default=256)
    parser.add_argument("--output", type=int, default=128)


def write_report(name: str, text: str, data: dict) -> int:
    """Print the report and write benchmarks/results/<name>.{md,json}."""
    print(text)
    (HERE / "results" / f"{name}.md").write_text(text)
    (HERE / "results" / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--phase", choices=("cold", "warm"))
    parser.add_argument("--out", default=str(HERE / "results" / "gpu"))
    add_load_arguments(parser, rounds=9, requests=1200)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--report", metavar="DIR", help="combine DIR's two phases into results/gpu_serving.{md,json}")
    args = parser.parse_args()
    if args.report:
        return write_report("gpu_serving", *report(Path(args.report)))
    if not (args.model and args.phase):
        parser.error("--model and --phase are needed (or --report DIR)")
    phase(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
