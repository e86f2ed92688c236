"""The node's log: the agent's own lines, and the failure reasons read back from it.

One module because both sides are the same file (``logs/node-<rank>.log``, where the engines'
output goes too): the agent writes timestamped lines; a failure reason names a process's exit
code, the known error it matches (hpc_serve.node.diagnosis) or else its root error (the first
exception line), and its last lines. Stdlib only.
"""

from __future__ import annotations

import os
import re
import time
from collections import deque

from .diagnosis import diagnose


class NodeLog:
    """Timestamped lines to stdout (Slurm's output file) and to the registry's node log."""

    def __init__(self, path: str, rank: int) -> None:
        self.path, self.rank = path, rank

    def __call__(self, message: str) -> None:
        line = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} node {self.rank}: {message}"
        print(line, flush=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")


def tail(path: str, lines: int = 12) -> str:
    """The last ``lines`` lines of a log, joined, for failure reasons."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return "\n".join(line.rstrip() for line in deque(handle, maxlen=lines))
    except OSError:
        return "(no log)"


_LOG_PREFIX = re.compile(r"^\([^)]*\)\s+[A-Z]+\s+\S+\s+\S+\s+\[[^\]]*\]\s?")
_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit): \S.*$")


def _recent(path: str, lines: int = 400) -> list[str] | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return list(deque(handle, maxlen=lines))
    except OSError:
        return None


def root_error(path: str, lines: int = 400) -> str | None:
    """The first exception line ("ValueError: ...") among a log's last lines: the root cause."""
    for line in _recent(path, lines) or []:
        text = _LOG_PREFIX.sub("", line.strip())
        if _EXCEPTION.match(text):
            return text
    return None


def exit_reason(what: str, where: str, code: int, log_path: str) -> str:
    """One line naming the process, its exit code and, for a known error, what happened and what
    to change (else its root error); then its root error and its last lines."""
    error = root_error(log_path)
    known = diagnose(_recent(log_path) or [])
    head = f"{what} on {where} exited with code {code}" + (f": {known or error}" if known or error else "")
    root = f"\nroot error: {error}" if known and error else ""
    return f"{head}{root}\nlast lines of its log:\n{tail(log_path, 8)}"
