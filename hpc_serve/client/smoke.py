"""The checks a user runs after deploying: does the endpoint serve what vLLM's OpenAI API serves?

Stdlib HTTP only (no openai package needed), so it runs on any login node and through a tunnel.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Check:
    """One check's outcome: ok, False (failed) or None (skipped), its latency and what was seen."""

    name: str
    ok: bool | None
    seconds: float
    detail: str


class _Failed(Exception):
    pass


class Client:
    """Minimal OpenAI-API client: JSON requests with the key, SSE streaming."""

    def __init__(self, base_url: str, api_key: str, timeout: float = 60.0) -> None:
        self.base, self.key, self.timeout = base_url.rstrip("/"), api_key, timeout

    def _request(self, path: str, body: dict | None) -> urllib.request.Request:
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        data = json.dumps(body).encode() if body is not None else None
        return urllib.request.Request(f"{self.base}{path}", data=data, headers=headers)

    def call(self, path: str, body: dict | None = None) -> Any:
        try:
            with urllib.request.urlopen(self._request(path, body), timeout=self.timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:200]
            raise _Failed(f"HTTP {exc.code}: {detail}") from None
        except (OSError, ValueError) as exc:
            raise _Failed(str(exc)) from None

    def stream(self, path: str, body: dict) -> list[str]:
        """The `data:` payloads of a server-sent event stream, in order."""
        events = []
        try:
            with urllib.request.urlopen(self._request(path, body), timeout=self.timeout) as response:
                for raw in response:
                    line = raw.decode().strip()
                    if line.startswith("data:"):
                        events.append(line[5:].strip())
        except (urllib.error.HTTPError, OSError) as exc:
            raise _Failed(str(exc)) from None
        return events


def _health(client: Client, model: str) -> str:
    root = client.base.removesuffix("/v1")
    try:
        with urllib.request.urlopen(f"{root}/health", timeout=client.timeout) as response:
            return f"HTTP {response.status}"
    except (urllib.error.HTTPError, OSError) as exc:
        raise _Failed(str(exc)) from None


def _models(client: Client, model: str) -> str:
    ids = [entry["id"] for entry in client.call("/models")["data"]]
    if model not in ids:
        raise _Failed(f"{model} not listed (got {ids})")
    return f"lists {model}"


def _completion(client: Client, model: str) -> str:
    out = client.call("/completions", {"model": model, "prompt": "Hello", "max_tokens": 4})
    choice = out["choices"][0]
    if out["usage"]["completion_tokens"] != 4 or choice["finish_reason"] != "length":
        raise _Failed(f"expected 4 tokens and finish_reason length, got {out['usage']} {choice['finish_reason']}")
    return f"4 tokens: {choice['text']!r}"


def _chat(client: Client, model: str) -> str:
    out = client.call("/chat/completions", {"model": model, "max_tokens": 4,
                                            "messages": [{"role": "user", "content": "Hi"}]})
    message = out["choices"][0]["message"]
    if message["role"] != "assistant":
        raise _Failed(f"role {message['role']}")
    return f"assistant: {message['content']!r}"


def _stream(client: Client, model: str) -> str:
    events = client.stream("/chat/completions", {"model": model, "max_tokens": 4, "stream": True,
                                                 "messages": [{"role": "user", "content": "Hi"}]})
    if not events or events[-1] != "[DONE]":
        raise _Failed(f"the stream did not end with [DONE] ({events[-1:]})")
    chunks = [json.loads(event) for event in events[:-1]]
    if len(chunks) < 2:
        raise _Failed(f"only {len(chunks)} chunk(s)")
    return f"{len(chunks)} chunks, then [DONE]"


def _logprobs(client: Client, model: str) -> str:
    out = client.call("/completions", {"model": model, "prompt": "Hello", "max_tokens": 3, "logprobs": 2})
    logprobs = out["choices"][0]["logprobs"]
    if not logprobs or len(logprobs["token_logprobs"]) != 3 or not logprobs["top_logprobs"]:
        raise _Failed(f"no logprobs for 3 tokens: {logprobs}")
    return f"3 tokens, top-{len(logprobs['top_logprobs'][0])} each"


_STOP_PROMPTS = ("The cluster", "Hello", "Once upon a time", "1, 2, 3,", "Paris is", "def main():")


def _stop(client: Client, model: str) -> str:
    # Greedy decoding is repeatable: pick a character of an unconstrained answer as the stop
    # sequence; the answer must then end just before it. (Tiny test models often answer with
    # tokens that decode to nothing: a few prompts are tried. ignore_eos is a vLLM option.)
    for prompt in _STOP_PROMPTS:
        base = {"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        text = client.call("/completions", base)["choices"][0]["text"]
        stop = next((c for i, c in enumerate(text) if i >= 1 and c.isprintable() and not c.isspace()
                     and c not in text[:i]), None)
        if stop is not None:
            break
    else:
        return "skipped: the model's answers had no usable stop character"
    choice = client.call("/completions", {**base, "stop": [stop]})["choices"][0]
    expected = text[:text.index(stop)]
    if choice["finish_reason"] != "stop" or choice["text"] != expected:
        raise _Failed(f"stop {stop!r}: finish_reason {choice['finish_reason']}, text {choice['text']!r} "
                      f"(expected {expected!r})")
    return f"stopped before {stop!r}"


def _n(client: Client, model: str) -> str:
    out = client.call("/completions", {"model": model, "prompt": "Hello", "max_tokens": 2, "n": 3,
                                       "temperature": 1.0})
    if sorted(c["index"] for c in out["choices"]) != [0, 1, 2]:
        raise _Failed(f"{len(out['choices'])} choices")
    return "3 choices"


def _batch(client: Client, model: str) -> str:
    prompts = ["Hello", "Bonjour", "Hallo", "Hola"]
    out = client.call("/completions", {"model": model, "prompt": prompts, "max_tokens": 2})
    if sorted(c["index"] for c in out["choices"]) != [0, 1, 2, 3]:
        raise _Failed(f"{len(out['choices'])} choices for 4 prompts")
    return "4 prompts, 4 choices"


def _embeddings(client: Client, model: str) -> str | None:
    try:
        out = client.call("/embeddings", {"model": model, "input": "Hello"})
    except _Failed as exc:
        if any(code in str(exc) for code in ("HTTP 400", "HTTP 404", "HTTP 501")):
            return None  # this model (or task) does not serve embeddings
        raise
    return f"{len(out['data'][0]['embedding'])} dimensions"


CHECKS: list[tuple[str, Callable[[Client, str], str | None]]] = [
    ("/health", _health), ("/v1/models", _models), ("completion", _completion), ("chat", _chat),
    ("streaming chat", _stream), ("logprobs", _logprobs), ("stop sequences", _stop), ("n>1", _n),
    ("batch of prompts", _batch), ("embeddings", _embeddings),
]


def run_checks(base_url: str, api_key: str, model: str,
               on_check: Callable[[Check], None] | None = None) -> list[Check]:
    """Every check against ``base_url`` (``.../v1``), in order; each reports as it ends."""
    client = Client(base_url, api_key)
    results = []
    for name, check in CHECKS:
        start = time.perf_counter()
        try:
            detail = check(client, model)
            ok = None if detail is None or detail.startswith("skipped") else True
            detail = detail or "skipped: the model does not serve embeddings"
        except _Failed as exc:
            ok, detail = False, str(exc)
        except (KeyError, IndexError, TypeError) as exc:
            ok, detail = False, f"unexpected answer ({type(exc).__name__}: {exc})"
        result = Check(name, ok, time.perf_counter() - start, detail)
        results.append(result)
        if on_check is not None:
            on_check(result)
    return results
