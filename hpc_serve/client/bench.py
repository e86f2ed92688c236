"""`hpc-serve bench`: vLLM's own benchmark (`vllm bench serve`) against a READY deployment.

The benchmark runs where this is called (a login node reaches the compute nodes), with the vLLM
named by ``vllm_cmd``, else `vllm` on PATH, else the deployment's own engine command where this
machine has it. The key reaches it as OPENAI_API_KEY in its environment (vLLM's benchmark reads
it there), never in its argv. Its JSON result and its output are kept in the deployment's folder,
``bench/<time>.json`` and ``.log`` (0600).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import IO, Any

from ..errors import HpcServeError
from ..registry import BENCH, Registry, read_json, registry_root
from . import control

#: The percentiles asked of vLLM's benchmark (and shown).
PERCENTILES = (50, 90, 99)
#: What the table shows: (label, the result's key, format), in order.
SHOWN: tuple[tuple[str, str, str], ...] = (
    ("requests completed", "completed", "{:.0f}"),
    ("requests failed", "failed", "{:.0f}"),
    ("duration (s)", "duration", "{:.1f}"),
    ("requests/s", "request_throughput", "{:.2f}"),
    ("output tokens/s", "output_throughput", "{:.1f}"),
    ("total tokens/s", "total_token_throughput", "{:.1f}"),
    *((f"{label} {stat} (ms)", f"{stat}_{key}_ms", "{:.1f}")
      for label, key in (("TTFT", "ttft"), ("TPOT", "tpot"), ("ITL", "itl"))
      for stat in ("mean", *(f"p{p}" for p in PERCENTILES))),
)
PIP_HINT = "pip install 'hpc-serve[bench]' (it installs vLLM), or pass --vllm-cmd /path/to/venv/bin/vllm"


@dataclass(frozen=True)
class Load:
    """What the benchmark sends: ``prompts`` random prompts of ``input_len`` tokens, each answered
    with exactly ``output_len`` tokens (ignore_eos), at ``rate`` requests/s (None: all at once),
    at most ``concurrency`` at a time (None: no limit); ``extra``: more `vllm bench serve` flags."""

    input_len: int = 256
    output_len: int = 128
    prompts: int = 200
    rate: float | None = None
    concurrency: int | None = None
    chat: bool = False
    seed: int = 0
    extra: tuple[str, ...] = ()

    def check(self) -> None:
        """HpcServeError for a load that cannot run, before anything starts."""
        for name in ("input_len", "output_len", "prompts"):
            if getattr(self, name) < 1:
                raise HpcServeError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)}).",
                                    "Give a positive number.")
        if self.rate is not None and self.rate <= 0:
            raise HpcServeError(f"--rate must be above 0 requests/s (got {self.rate}).",
                                "Leave it out to send every request at once.")
        if self.concurrency is not None and self.concurrency < 1:
            raise HpcServeError(f"--concurrency must be at least 1 (got {self.concurrency}).",
                                "Leave it out for no limit.")
        clash = sorted(word.split("=")[0] for word in self.extra if _takes(word))
        if clash:
            raise HpcServeError(f"{', '.join(clash)} after -- would override what hpc-serve sets.",
                                "Leave them out: the deployment gives the address and model, the registry keeps "
                                "the result.")


#: `vllm bench serve`'s flags that hpc-serve sets: none of them may come after --.
TAKEN = ("--base-url", "--host", "--port", "--model", "--served-model-name", "--save-result", "--append-result",
         "--result-dir", "--result-filename", "--endpoint", "--backend")


def _takes(word: str) -> bool:
    """``word`` is one of TAKEN as vLLM's parser reads it (``_`` for ``-``, a prefix of one)."""
    if not word.startswith("--") or word == "--":
        return False
    name = word.split("=", 1)[0].replace("_", "-")
    return len(name) > 3 and any(flag.startswith(name) for flag in TAKEN)


@dataclass(frozen=True)
class BenchRun:
    """One benchmark: the deployment, its result (vLLM's JSON) and where it is kept."""

    id: str
    url: str
    result: dict[str, Any]
    result_file: str
    log_file: str


def vllm_command(spec: dict, explicit: str | None = None) -> list[str]:
    """`vllm bench serve`'s argv start: ``explicit`` (a vllm command), else `vllm` on PATH, else the
    deployment's engine command (its ``serve`` replaced) where its program exists on this machine."""
    if explicit:
        words = shlex.split(explicit)
        if words and words[-1] == "serve":
            words = words[:-1]
        if not words or not (shutil.which(words[0]) or os.path.isfile(words[0])):
            raise HpcServeError(f"--vllm-cmd {explicit!r}: no such program here.", PIP_HINT)
        return [*words, "bench", "serve"]
    if shutil.which("vllm"):
        return ["vllm", "bench", "serve"]
    engine = shlex.split(spec.get("engine_cmd") or "")
    if len(engine) >= 2 and engine[-1] == "serve" and (shutil.which(engine[0]) or os.path.isfile(engine[0])):
        return [*engine[:-1], "bench", "serve"]
    raise HpcServeError("vLLM is not installed here: `hpc-serve bench` runs vLLM's own benchmark "
                        "(`vllm bench serve`).", PIP_HINT)


def bench_argv(vllm: list[str], base_url: str, model: str, tokenizer: str, load: Load,
               folder: str, name: str) -> list[str]:
    """The full `vllm bench serve` command line (no key in it: that goes in the environment)."""
    argv = [*vllm, "--backend", "openai-chat" if load.chat else "openai", "--base-url", base_url,
            "--endpoint", "/v1/chat/completions" if load.chat else "/v1/completions",
            "--model", model, "--tokenizer", tokenizer, "--dataset-name", "random",
            "--random-input-len", str(load.input_len), "--random-output-len", str(load.output_len),
            "--num-prompts", str(load.prompts), "--ignore-eos", "--seed", str(load.seed),
            "--request-rate", "inf" if load.rate is None else str(load.rate),
            "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--metric-percentiles", ",".join(str(p) for p in PERCENTILES),
            "--save-result", "--result-dir", folder, "--result-filename", name]
    if load.concurrency is not None:
        argv += ["--max-concurrency", str(load.concurrency)]
    return argv + list(load.extra)


def _tokenizer(spec: dict, served_model: str, explicit: str | None) -> str:
    """The tokenizer the prompts are made with: ``explicit``, else the model as the spec names it."""
    return explicit or spec.get("model") or served_model


def _pump(source: IO[bytes], log: IO[bytes], echo: IO[bytes] | None) -> list[bytes]:
    """Copy the benchmark's output into its log (and ``echo``) as it comes; return its last lines."""
    tail: list[bytes] = []
    for chunk in iter(lambda: source.read1(65536), b""):  # type: ignore[attr-defined]
        log.write(chunk)
        log.flush()
        if echo is not None:
            echo.write(chunk)
            echo.flush()
        tail = (tail + chunk.replace(b"\r", b"\n").splitlines())[-20:]
    return tail


def run_bench(key: str, load: Load, home: str | None = None, vllm_cmd: str | None = None,
              tokenizer: str | None = None, echo: bool = True) -> BenchRun:
    """Run `vllm bench serve` against deployment ``key`` (READY); keep and return its result."""
    load.check()
    data = control.endpoint(key, home)
    dep = Registry(registry_root(home)).deployment(data["id"])
    vllm = vllm_command(dep.spec, vllm_cmd)
    folder = dep.file(BENCH)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    now = time.time()
    stamp = f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}.{int(now * 1e6) % 1_000_000:06d}"
    name, log_file = f"{stamp}.json", os.path.join(folder, f"{stamp}.log")
    base_url = data["url"].removesuffix("/").removesuffix("/v1")
    argv = bench_argv(vllm, base_url, data["served_model"], _tokenizer(dep.spec, data["served_model"], tokenizer),
                      load, folder, name)
    hub = {k: v for k, v in dep.spec.get("env", ()) if k in ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE")}
    env = {**hub, **os.environ, "OPENAI_API_KEY": dep.api_key}  # the tokenizer from the job's cache unless set here
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as log:
        log.write(f"$ {shlex.join(argv)}\n".encode())
        try:
            process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, umask=0o077)
        except OSError as exc:
            raise HpcServeError(f"Cannot start {argv[0]}: {exc.strerror}.", PIP_HINT) from None
        try:
            tail = _pump(process.stdout, log, sys.stderr.buffer if echo else None)  # type: ignore[arg-type]
            code = process.wait()
        except KeyboardInterrupt:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            raise
    result_file = os.path.join(folder, name)
    result = read_json(result_file, None) if os.path.exists(result_file) else None
    if code != 0 or not result:
        last = next((line.decode(errors="replace").strip() for line in reversed(tail) if line.strip()), "")
        raise HpcServeError(f"vllm bench serve against {data['id']} failed (exit {code}): {last}",
                            f"Its whole output: {log_file}")
    return BenchRun(data["id"], data["url"], result, result_file, log_file)


def shown_rows(result: dict[str, Any]) -> list[tuple[str, str, float]]:
    """(label, shown value, value) of the table's rows that the result has."""
    rows = []
    for label, field, form in SHOWN:
        value = result.get(field)
        if isinstance(value, (int, float)):
            rows.append((label, form.format(value), float(value)))
    return rows
