"""Which replicas the router should send requests to now, from the registry alone. Stdlib only.

A group is a list of replica slots (deployment ids). A slot serves through the deployments of its
``--auto-renew`` chain (the slot's id, then each ``successor``): each one that is READY, has its
endpoint published and whose node 0 still beats is a member, at its endpoint's base URL (a
restarted replica comes back at a new address). A replica leaves the moment it withdraws its
endpoint (a cancel, a restart, a hand-over, a failure: the agent removes endpoint.json before it
stops anything), and when its node 0 falls silent for ``SILENT_S`` (a node or agent that died with
no one to withdraw).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable

from ..node.heartbeat import SILENT_S
from ..registry import BEATS, TERMINAL, CorruptRecord, Deployment, Registry


def slot_chain(registry: Registry, slot: str, limit: int = 1000) -> list[Deployment]:
    """The deployments of one slot: its first and every successor, oldest first."""
    chain, current = [], registry.deployment(slot)
    for _ in range(limit):
        chain.append(current)
        try:
            successor = current.state.get("successor")
        except CorruptRecord:
            break
        if not successor or successor in {d.id for d in chain}:
            break
        current = registry.deployment(successor)
    return chain


def slot_ended(registry: Registry, slot: str) -> bool:
    """Whether nothing of this slot can serve again (its newest deployment has ended)."""
    try:
        return slot_chain(registry, slot)[-1].phase in TERMINAL
    except CorruptRecord:
        return False


@dataclass
class Membership:
    """The wanted members of a group, judged with this process's clock for the beats."""

    registry: Registry
    clock: Callable[[], float] = time.monotonic
    silent_s: float = SILENT_S

    def __post_init__(self) -> None:
        self._beats: dict[str, tuple[object, float]] = {}

    def _beating(self, dep: Deployment) -> bool:
        try:
            value = (dep.read(dep.rank_file(BEATS, 0), {}) or {}).get("beat")
        except (CorruptRecord, OSError):
            return True  # unreadable now is not silent
        now, last = self.clock(), self._beats.get(dep.id)
        if last is None or last[0] != value:
            self._beats[dep.id] = (value, now)
            return True
        return now - last[1] <= self.silent_s

    def wanted(self, slots: Iterable[str]) -> dict[str, str]:
        """Base URL -> deployment id of every replica that serves now."""
        found: dict[str, str] = {}
        for slot in slots:
            for dep in slot_chain(self.registry, slot):
                try:
                    if dep.phase != "READY":
                        continue
                    base = dep.endpoint.get("base")
                except CorruptRecord:
                    continue
                if base and self._beating(dep):
                    found[base] = dep.id
        return found
