"""Signs of life between the node agents of one deployment, through the registry.

Every agent rewrites ``beats/<rank>.json`` with a growing counter every ``HEARTBEAT_S`` seconds
from a thread of its own. A node whose counter has not moved for ``SILENT_S`` seconds, as the
watching node's own clock measures it, is taken for dead: powered off, frozen, or its agent
killed. Only movement is compared, never clocks of different machines; the watching clock is
the ``clock`` given (``time.monotonic`` unless a test gives its own). Stdlib only.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable, Iterable

from ..registry import BEATS, CorruptRecord, Deployment

HEARTBEAT_S = 2.0
SILENT_S = float(os.environ.get("HPC_SERVE_NODE_SILENCE", "10"))
#: The watch reads the others' beats at most this often (the files are on a shared filesystem).
CHECK_EVERY_S = 1.0


class Heartbeat:
    """This node's beat, and a watch on the others'."""

    def __init__(self, dep: Deployment, rank: int, stop: threading.Event,
                 silent_s: float = SILENT_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.dep, self.rank, self.stop, self.silent_s, self.clock = dep, rank, stop, silent_s, clock
        self._seen: dict[int, tuple[object, float]] = {}
        self._checked_at: float | None = None
        os.makedirs(dep.file(BEATS), mode=0o700, exist_ok=True)

    def start(self) -> "Heartbeat":
        """Beat until ``stop`` is set (a daemon thread: a frozen or killed agent stops beating)."""
        threading.Thread(target=self._beat, name="heartbeat", daemon=True).start()
        return self

    def _beat(self) -> None:
        count = 0
        while True:
            count += 1
            try:
                self.dep.write(self.dep.rank_file(BEATS, self.rank), {"beat": count, "pid": os.getpid()})
            except OSError:
                pass  # a shared filesystem hiccup: the next beat tries again
            if self.stop.wait(HEARTBEAT_S):
                return

    def silent(self, ranks: Iterable[int]) -> list[int]:
        """The ranks whose beat has not moved for ``silent_s`` (judged only once seen beating)."""
        now, quiet = self.clock(), []
        if self._checked_at is not None and now - self._checked_at < CHECK_EVERY_S:
            return quiet
        self._checked_at = now
        for rank in ranks:
            try:
                value = (self.dep.read(self.dep.rank_file(BEATS, rank), {}) or {}).get("beat")
            except (CorruptRecord, OSError):
                continue
            if value is None:
                continue
            last = self._seen.get(rank)
            if last is None or last[0] != value:
                self._seen[rank] = (value, now)
            elif now - last[1] > self.silent_s:
                quiet.append(rank)
        return quiet

    def reason(self, rank: int, hostname: str) -> str:
        """The failure reason for node ``rank`` falling silent."""
        return (f"node {rank} ({hostname}) stopped reporting: no sign of life for "
                f"{self.silent_s:.0f} s (the node is down or frozen, or its agent was killed)")
