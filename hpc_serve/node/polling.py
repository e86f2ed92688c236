"""Waiting for a condition, never for a fixed time: the one poll loop of the node side.

Its own module because every other node module waits on something (node records, Ray's head,
a secret, a leftover process's end, the other agents' notes) and none of them owns waiting.
Stdlib only.
"""

from __future__ import annotations

import threading
import time
from typing import Callable


def wait_until(condition: Callable[[], object], timeout_s: float, poll_s: float = 0.1,
               stop: threading.Event | None = None) -> bool:
    """Poll ``condition`` until true (True), ``stop`` is set or ``timeout_s`` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        if stop is not None and stop.wait(poll_s):
            return False
        if stop is None:
            time.sleep(poll_s)
    return False
