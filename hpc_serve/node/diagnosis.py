"""Known errors: the failures users hit, matched on the real text vLLM, Ray, torch, NCCL, Gloo and
Hugging Face print, each turned into one line that says what happened and what to change.

The texts are vLLM's, torch's and the others' own (their format strings; see docs/reliability.md
for where each comes from and which were captured from real runs). A log's raw last lines stay in
the failure reason and in `hpc-serve logs`. Stdlib only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Match


@dataclass(frozen=True)
class KnownError:
    """One failure: a pattern searched in each log line, what happened and what to change (both
    formatted with the pattern's named groups)."""

    key: str
    pattern: re.Pattern[str]
    happened: str
    change: str

    def explain(self, found: Match[str]) -> str:
        """The one line for a match: what happened, then what to change."""
        groups = {name: _tidy(value) if name == "limit" else value
                  for name, value in found.groupdict(default="").items()}
        return f"{self.happened.format(**groups)}: {self.change.format(**groups)}"


def _tidy(value: str) -> str:
    """'512.0' -> '512': a token count as a user types it."""
    return value[:-2] if re.fullmatch(r"\d+\.0", value) else value


def _known(key: str, pattern: str, happened: str, change: str) -> KnownError:
    return KnownError(key, re.compile(pattern), happened, change)


_MORE_GPUS = "spread the model over more GPUs (--tp, --pp)"
_NETWORK = ("pass --network with the interface the nodes reach each other on (it sets NCCL_SOCKET_IFNAME "
            "and GLOO_SOCKET_IFNAME), and check that no firewall blocks ports between the nodes")
_DOWNLOAD = ("fetch it first on a login node into a cache every node reads (hpc-serve fetch MODEL --hf-home DIR), "
             "then submit with --hf-home DIR --offline, or pass the model's local folder")

#: Matched in this order when one line fits several; across lines, the first line that fits wins.
CATALOGUE: tuple[KnownError, ...] = (
    _known("max-model-len",
           r"User-specified max_model_len \((?P<asked>\d+)\) is greater than the derived max_model_len "
           r"\((?P<key>\w+)=(?P<limit>[\d.]+)",
           "max_model_len {asked} is more than the model allows ({limit} tokens: {key} in its config.json)",
           "pass -- --max-model-len {limit} or less, or leave it out"),
    _known("kv-cache-too-small",
           r"To serve at least one request with the models?'s max seq len \((?P<length>\d+)\), "
           r"\((?P<needed>[\d.]+) GiB KV cache is needed, which is larger than the available KV cache memory "
           r"\((?P<left>[\d.]+) GiB\)",
           "the KV cache cannot hold one request of max_model_len {length} ({needed} GiB needed, {left} GiB "
           "left for it)",
           "lower -- --max-model-len, give the KV cache more memory (-- --gpu-memory-utilization on GPUs; "
           "--env VLLM_CPU_KVCACHE_SPACE=GiB or -- --kv-cache-memory-bytes on the CPU build), or "
           + _MORE_GPUS),
    _known("no-kv-cache-memory", r"No available memory for the cache blocks",
           "no memory was left for the KV cache once the weights were loaded",
           "raise -- --gpu-memory-utilization (on the CPU build: --env VLLM_CPU_KVCACHE_SPACE=GiB), or "
           + _MORE_GPUS),
    _known("kv-cache-over-ram",
           r"Available memory on node \d+ \((?P<free>[\d.]+)/(?P<total>[\d.]+) GiB\) on kv cache allocation is "
           r"less than requested memory for kv",
           "the KV cache asked for does not fit the node's free memory ({free} of {total} GiB free)",
           "lower VLLM_CPU_KVCACHE_SPACE or -- --kv-cache-memory-bytes, or free memory on the node"),
    _known("gpu-memory-taken",
           r"Free memory on device (?:\S+ )?\((?P<free>[\d.]+)/(?P<total>[\d.]+) GiB\) on startup is less than "
           r"desired GPU memory utilization \((?P<share>[\d.]+)",
           "only {free} of {total} GiB of GPU memory was free when vLLM started, less than "
           "--gpu-memory-utilization {share} asks for: another process holds the GPU",
           "see nvidia-smi on that node (a leftover engine, another job on a shared node), or pass a lower "
           "-- --gpu-memory-utilization"),
    _known("cpu-memory-taken",
           r"Available memory on node \d+ \((?P<free>[\d.]+)/(?P<total>[\d.]+) GiB\) on startup is less than "
           r"desired CPU memory utilization \((?P<share>[\d.]+)",
           "only {free} of {total} GiB of memory was free when vLLM started, less than "
           "--gpu-memory-utilization {share} asks for (on the CPU build it is the share of memory)",
           "pass a lower -- --gpu-memory-utilization, or free memory on the node"),
    _known("cuda-out-of-memory",
           r"CUDA out of memory\. Tried to allocate (?P<size>[\d.]+ ?\w+)|Failed to load model - not enough GPU memory",
           "CUDA ran out of GPU memory",
           _MORE_GPUS + " or use a quantized model; when the weights did load, lower -- --max-num-seqs or "
           "-- --max-model-len, or add -- --enforce-eager"),
    _known("ray-unsupported", r"current platform (?P<platform>\w+) does not support ray",
           "this vLLM build ({platform}) cannot run its workers on Ray",
           "pass --launcher mp"),
    _known("ray-placement",
           r"Cannot provide a placement group|Current node has no GPU available|"
           r"The number of required GPUs exceeds the total number of available GPUs",
           "Ray could not place vLLM's workers: its cluster has fewer GPUs than the layout needs",
           "make --tp x --pp (x --dp) match the GPUs Slurm gives (--gpus-per-node, --nodes); the node logs "
           "show how many GPUs joined Ray"),
    _known("nccl-timeout", r"Watchdog caught collective operation timeout",
           "an NCCL collective timed out: a node stopped answering, or the network between nodes does not "
           "carry NCCL's traffic",
           _NETWORK + "; rerun with --env NCCL_DEBUG=INFO, and keep TP inside nodes (PP across them)"),
    _known("nccl-system-error",
           r"unhandled system error|ncclSystemError|ncclRemoteError|remote process exited or there was a "
           r"network error",
           "NCCL failed on a system call or the network",
           "rerun with --env NCCL_DEBUG=INFO and read its 'Last error' line; check /dev/shm's size on the "
           "nodes and --network; where there is no InfiniBand, --env NCCL_IB_DISABLE=1"),
    _known("gloo-loopback",
           r"Using the loopback address as fallback|Connection refused, remote=\[?127\.",
           "a node offered Gloo a loopback address, so the others cannot reach it",
           _NETWORK),
    _known("gloo-connect",
           r"Gloo connectFullMesh failed|timed out connecting: .*Connection refused|Connect timeout",
           "the engine's processes could not connect to each other over Gloo",
           _NETWORK),
    _known("model-gated", r"Cannot access gated repo|You are trying to access a gated repo",
           "the model is gated on Hugging Face and this job has no access to it",
           "accept its terms on huggingface.co, then " + _DOWNLOAD),
    _known("model-not-cached",
           r"Cannot find an appropriate cached snapshot folder|Cannot find the requested files in the disk cache|"
           r"We couldn't connect to '[^']+' to load the files",
           "the model is not in this node's Hugging Face cache, and the node cannot (or may not) download it",
           _DOWNLOAD),
    _known("model-missing", r"Invalid repository ID or local directory specified: '(?P<model>[^']+)'",
           "vLLM found no model '{model}' on this node: no folder with a config.json there, nor a repository "
           "it could download",
           "pass a folder every node can read (a shared file system), or " + _DOWNLOAD),
    _known("no-gpu",
           r"No CUDA GPUs are available|Failed to infer device type|is out of bounds for 0 devices|"
           r"CUDA_VISIBLE_DEVICES contains \[\]",
           "the engine saw no GPU on this node",
           "ask Slurm for GPUs (--gpus-per-node, or the partition's gres) and do not set CUDA_VISIBLE_DEVICES "
           "yourself; `srun nvidia-smi` inside a job shows what a job sees"),
)


def find_known(lines: Iterable[str]) -> tuple[KnownError, Match[str]] | None:
    """The first known error among ``lines`` and its match, or None."""
    for line in lines:
        for known in CATALOGUE:
            found = known.pattern.search(line)
            if found:
                return known, found
    return None


def diagnose(lines: Iterable[str]) -> str | None:
    """The catalogue's line for the first known error among ``lines``, or None."""
    hit = find_known(lines)
    return None if hit is None else hit[0].explain(hit[1])
