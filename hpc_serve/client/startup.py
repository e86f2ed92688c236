"""Where a deployment's start-up time went: consecutive phases from submission to READY.

Read after the fact from the registry: when the job was submitted (``job.json``), node 0's marks
(``timings/0.json``: job start, agent start, every node reported, preflight, Ray formed,
engine started, READY) and vLLM's own log
lines in node 0's log (weights loaded, torch.compile, CUDA graphs, engine initialised, API server
up). Each phase ends at a milestone and starts where the one before it ended, so the phases add
up to the whole start-up. Stdlib only.
"""

from __future__ import annotations

import re
import time

from ..registry import JOB, PREFLIGHT, TIMINGS, CorruptRecord, Deployment

#: vLLM's milestones, in the order they come, and the line that says each was reached.
VLLM_MILESTONES = (
    ("weights loaded", re.compile(r"Loading weights took|Model loading took")),
    ("torch.compile", re.compile(r"torch\.compile takes .* in total")),
    ("CUDA graphs captured", re.compile(r"Graph capturing finished")),
    ("engine initialised (profile, KV cache, warm-up)",
     re.compile(r"init engine \(profile, create kv cache, warmup model\) took")),
    ("API server up", re.compile(r"Starting vLLM (?:API )?server on")),
)
#: node 0's marks that end a phase, and the phase's name.
MARK_PHASES = (("job_start", "queued"), ("agent_start", "agents started"), ("nodes_reported", "every node reported"),
               ("preflight_done", "preflight"), ("ray_formed", "Ray formed"), ("vllm_started", "engine launched"))
_VLLM_TIME = re.compile(r"^(?:\([^)]*\)\s+)?(?:DEBUG|INFO|WARNING|ERROR)\s+(\d\d)-(\d\d) (\d\d):(\d\d):(\d\d)\s")
_ENGINE_STARTED = "node 0: started vllm"


def _vllm_time(line: str, year: int) -> float | None:
    """The time of a vLLM log line ("INFO 12-02 18:01:30 [...]", the node's local time)."""
    found = _VLLM_TIME.match(line)
    if not found:
        return None
    month, day, hour, minute, second = (int(part) for part in found.groups())
    return time.mktime((year, month, day, hour, minute, second, 0, 0, -1))


def vllm_milestones(log_text: str, since: float) -> list[tuple[str, float]]:
    """(milestone, when) from the vLLM run the node log started last, in the order reached."""
    lines = log_text.splitlines()
    starts = [index for index, line in enumerate(lines) if _ENGINE_STARTED in line]
    year = time.localtime(since).tm_year
    found: list[tuple[str, float]] = []
    for line in lines[starts[-1] + 1:] if starts else []:
        for name, pattern in VLLM_MILESTONES:
            if pattern.search(line) and name not in dict(found):
                at = _vllm_time(line, year)
                if at is not None:
                    found.append((name, at))
    return found


def startup_phases(dep: Deployment) -> tuple[tuple[str, float], ...]:
    """(phase, seconds) from submission (the run's agent start, after a restart) to READY; empty
    before READY or when the records do not say."""
    try:
        marks = dep.read(dep.rank_file(TIMINGS, 0), {}) or {}
        job, state = dep.read(JOB, {}) or {}, dep.state
    except CorruptRecord:
        return ()
    ready = marks.get("ready")
    if not ready:
        return ()
    points: list[tuple[str, float]] = []
    submitted = float(job.get("submitted") or 0)
    if not state.get("restart") and 0 < submitted <= float(marks.get("job_start") or ready):
        points.append(("submitted", submitted))  # not on the sbatch path: its agent wrote job.json
    points += [(name, float(marks[mark])) for mark, name in MARK_PHASES if marks.get(mark)]
    if marks.get("vllm_started"):
        try:
            log_text = open(dep.log_path(0), encoding="utf-8", errors="replace").read()
        except OSError:
            log_text = ""
        points += vllm_milestones(log_text, float(marks["vllm_started"]))
    points.append(("READY (health and model checks)", float(ready)))
    phases, before = [], points[0][1]
    for name, at in points[1:]:
        at = min(max(at, before), float(ready))  # vLLM's lines have 1 s resolution
        phases.append((name, at - before))
        before = at
    return tuple(phases)


def preflight_rows(dep: Deployment) -> tuple[dict, ...]:
    """Every node's preflight record of the deployment's current run, by rank."""
    try:
        restart = int(dep.state.get("restart") or 0)
        records = dep.rank_records(PREFLIGHT)
    except CorruptRecord:
        return ()
    return tuple(record for _, record in sorted(records.items()) if int(record.get("restart") or 0) == restart)
