"""What a READY deployment's server is doing now, from vLLM's own /metrics: requests running and
waiting, KV cache use, and prompt and generation tokens a second (from two samples), per DP
engine. Read from the login node with the deployment's key; stdlib HTTP.
"""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from typing import Callable

#: The gauges and counters read, by what they are called here.
GAUGES = {"running": "vllm:num_requests_running", "waiting": "vllm:num_requests_waiting",
          "kv_cache_used": "vllm:kv_cache_usage_perc"}
COUNTERS = {"prompt_tps": "vllm:prompt_tokens_total", "generation_tps": "vllm:generation_tokens_total"}
#: How far apart the two samples are (the rates come from their difference).
SAMPLE_GAP_S = 0.5
_LINE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)')
_ENGINE = re.compile(r'engine="([^"]*)"')


@dataclass(frozen=True)
class EngineLoad:
    """One vLLM engine (one DP replica) now."""

    engine: str
    running: int
    waiting: int
    kv_cache_used: float  # 0..1
    prompt_tps: float
    generation_tps: float

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (f"engine {self.engine}: {self.running} running, {self.waiting} waiting, KV cache "
                f"{self.kv_cache_used * 100:.1f}% used, prompt {self.prompt_tps:.1f} tok/s, "
                f"generation {self.generation_tps:.1f} tok/s")


def parse(text: str) -> dict[str, dict[str, float]]:
    """The metrics read here from Prometheus text: ``{metric: {engine: value}}``, summed over
    other labels (model name)."""
    wanted = set(GAUGES.values()) | set(COUNTERS.values())
    found: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        match = _LINE.match(line)
        if not match or match["name"] not in wanted:
            continue
        engine = _ENGINE.search(match["labels"] or "")
        per_engine = found.setdefault(match["name"], {})
        key = engine.group(1) if engine else "0"
        per_engine[key] = per_engine.get(key, 0.0) + float(match["value"])
    return found


def scrape(base_url: str, key: str, timeout_s: float = 5.0) -> str:
    """GET ``base_url``/metrics with the key; OSError (urllib's errors) when it cannot."""
    request = urllib.request.Request(f"{base_url}/metrics", headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return response.read().decode(errors="replace")


def load_from(first: dict[str, dict[str, float]], second: dict[str, dict[str, float]],
              seconds: float) -> tuple[EngineLoad, ...]:
    """Every engine's load from two samples ``seconds`` apart."""
    engines = sorted(set().union(*(second.get(name, {}) for name in GAUGES.values())), key=str)

    def rate(name: str, engine: str) -> float:
        before, after = first.get(name, {}).get(engine, 0.0), second.get(name, {}).get(engine, 0.0)
        return max(after - before, 0.0) / seconds if seconds > 0 else 0.0

    return tuple(EngineLoad(engine, int(second.get(GAUGES["running"], {}).get(engine, 0)),
                            int(second.get(GAUGES["waiting"], {}).get(engine, 0)),
                            float(second.get(GAUGES["kv_cache_used"], {}).get(engine, 0.0)),
                            rate(COUNTERS["prompt_tps"], engine), rate(COUNTERS["generation_tps"], engine))
                 for engine in engines)


def live_load(base_url: str, key: str, gap_s: float = SAMPLE_GAP_S,
              sleep: Callable[[float], None] = time.sleep) -> tuple[tuple[EngineLoad, ...], str]:
    """(every engine's load now, ""), or ((), why it could not be read)."""
    try:
        first, at = parse(scrape(base_url, key)), time.monotonic()
        sleep(gap_s)
        second, seconds = parse(scrape(base_url, key)), time.monotonic() - at
    except urllib.error.HTTPError as exc:
        return (), f"{base_url}/metrics answered {exc.code}"
    except (OSError, ValueError) as exc:
        return (), f"{base_url}/metrics did not answer: {getattr(exc, 'reason', exc)}"
    if not second:
        return (), f"{base_url}/metrics has none of vLLM's request metrics"
    return load_from(first, second, seconds), ""
