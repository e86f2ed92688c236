"""A start-up that stalls is a failure: node 0 watches the engines' output (every node's log in
the registry) while vLLM loads, and a start-up with no new output on any node for
``--stall-timeout`` seconds is FAILED, naming how long and the last line, instead of holding its
nodes until the time limit. Stdlib only.
"""

from __future__ import annotations

import glob
import os
import time
from typing import Callable


#: How often the logs are looked at (a stat of each; they may sit on a shared file system).
LOOK_EVERY_S = 1.0


class OutputWatch:
    """Whether the files ``paths()`` names have grown within ``bound_s`` (0: never stalls)."""

    def __init__(self, paths: Callable[[], list[str]], bound_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.paths, self.bound_s, self.clock = paths, bound_s, clock
        self.size, self.moved_at = self._size(), clock()
        self.looked_at = self.moved_at

    def _size(self) -> int:
        total = 0
        for path in self.paths():
            try:
                total += os.stat(path).st_size
            except OSError:
                continue
        return total

    def silent_s(self) -> float | None:
        """Seconds without new output once that is ``bound_s`` or more; else None."""
        now = self.clock()
        if not self.bound_s or now - self.looked_at < LOOK_EVERY_S:
            return None
        self.looked_at, size = now, self._size()
        if size != self.size:
            self.size, self.moved_at = size, now
            return None
        silent = now - self.moved_at
        return silent if silent >= self.bound_s else None


def node_logs(logs_dir: str) -> Callable[[], list[str]]:
    """The deployment's node logs (``logs/node-<rank>.log``), as they are at each look."""
    return lambda: glob.glob(os.path.join(logs_dir, "node-*.log"))


def stall_reason(silent_s: float, bound_s: int, where: str, last_line: str) -> str:
    """The failure: how long nothing came, the setting, and the last line the engine printed."""
    return (f"the start-up stalled: no new output from the engine on any node for {silent_s:.0f} s while "
            f"loading (--stall-timeout {bound_s}); the last line on {where}: {last_line.strip() or '(none)'}")
