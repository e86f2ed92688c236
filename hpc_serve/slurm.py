"""Slurm's command-line tools, run through one runner with one error type. Stdlib only.

``run`` is the only place a Slurm tool is started: a failure is a ``SlurmError`` naming the
command, its exit code (or timeout) and the last line it wrote to stderr; failures where the
controller did not answer (``transient``) are retried a few times with a short backoff first.
A tool missing from PATH is ``SlurmMissing``; the functions whose callers work without Slurm
(the local executor, ``plan`` on a laptop) return None for it. ``QueueWatcher`` is the one
reader of the queue for status, wait and cancel: it asks squeue at most once per
``QUEUE_POLL_S`` per process and never reads "Slurm did not answer" as "the job has ended".
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence

from .errors import HpcServeError

#: Tries of one command when Slurm does not answer, and the first pause between them (doubled).
ATTEMPTS = 3
BACKOFF_S = 0.5
#: The queue is asked at most this often per process (status, wait and cancel share the answer).
QUEUE_POLL_S = 2.0
#: Slurm's own words (slurm_errno.c) when the request never reached the controller: always safe
#: to send again.
_NOT_REACHED = ("Unable to contact slurm controller (connect failure)", "Communication connection failure",
                "Connection refused", "Slurm backup controller in standby mode", "Rate limit exceeded",
                "Slurm temporarily unable to accept job", "try again later", "Problem talking to the database")
#: ... and when it may have been carried out without an answer coming back.
_NO_ANSWER = ("Unable to contact slurm controller", "Socket timed out on send/recv operation",
              "Zero Bytes were transmitted or received", "Message send failure", "Message receive failure",
              "Communication shutdown failure", "Connection timed out", "Connection reset by peer")
#: scancel exits with Slurm's error number modulo 256: 1800-1805 (the controller: 8-13), 1001-1004
#: (connection: 233-236), 5004-5005 (socket timeout: 140-141); trusted only when stderr is silent.
_NO_ANSWER_EXIT_CODES = {8, 9, 10, 11, 12, 13, 233, 234, 235, 236, 140, 141}
_GPU_GRES = re.compile(r"gpu(?::[^:,()]+)?:(\d+)")


class SlurmError(HpcServeError):
    """A Slurm command failed: ``command``, ``exit_code`` (None when it timed out or could not
    start), ``reason`` (stderr's last line, or what happened) and ``transient`` (Slurm did not
    answer: asking again later may work)."""

    def __init__(self, argv: Sequence[str], reason: str, exit_code: int | None = None,
                 transient: bool = False, problem: str | None = None, hint: str | None = None) -> None:
        self.command = " ".join(argv[:4]) + (" ..." if len(argv) > 4 else "")
        self.argv, self.reason, self.exit_code, self.transient = list(argv), reason, exit_code, transient
        how = f"exit code {exit_code}" if exit_code is not None else "no exit code"
        super().__init__(problem or f"{self.command} failed ({how}): {reason}", hint or (
            "Slurm's controller did not answer; try again in a minute." if transient else
            f"Run '{self.command}' yourself to see Slurm's full answer."))


class SlurmMissing(SlurmError):
    """The Slurm tool is not on PATH (Slurm is not installed here)."""

    def __init__(self, argv: Sequence[str]) -> None:
        super().__init__(argv, f"{argv[0]} is not on PATH", problem=f"{argv[0]} is not on PATH.",
                         hint="Run this on the cluster's login node.")


def which(command: str) -> str | None:
    """The path of ``command`` on PATH, or None (shutil.which without shutil's import cost)."""
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = os.path.join(folder, command)
        if folder and os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return candidate
    return None


def _failure(argv: Sequence[str], code: int, stderr: str) -> tuple[SlurmError, bool]:
    """The error of a failed run, and whether Slurm surely did not carry the request out."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    said = " ".join(lines)
    not_reached = any(words in said for words in _NOT_REACHED)
    transient = not_reached or any(words in said for words in _NO_ANSWER) or (
        not said and code in _NO_ANSWER_EXIT_CODES)
    return SlurmError(argv, lines[-1] if lines else f"exited with code {code}", code, transient), not_reached


def run(argv: Sequence[str], timeout_s: float = 15.0, *, attempts: int = ATTEMPTS, repeatable: bool = True,
        cwd: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """Run one Slurm command and return its stdout. SlurmMissing when the tool is not on PATH;
    SlurmError when it fails, after up to ``attempts`` tries while Slurm does not answer.
    ``repeatable=False`` (sbatch, requeue): a try that may have been carried out (a timeout) is
    not repeated; one that surely never reached the controller still is."""
    import subprocess

    path = which(argv[0])
    if path is None:
        raise SlurmMissing(argv)
    tried = 0
    while True:
        try:
            done = subprocess.run([path, *argv[1:]], capture_output=True, text=True, timeout=timeout_s,
                                  check=False, cwd=cwd, env=None if env is None else dict(env))
            if done.returncode == 0:
                return done.stdout
            error, not_reached = _failure(argv, done.returncode, done.stderr)
        except subprocess.TimeoutExpired:
            error, not_reached = SlurmError(argv, f"no answer within {timeout_s:g} s", None, True), False
        except OSError as exc:
            raise SlurmError(argv, f"could not start: {exc.strerror or exc}") from None
        tried += 1
        if not error.transient or not (repeatable or not_reached) or tried >= attempts:
            raise error
        time.sleep(BACKOFF_S * 2 ** (tried - 1))  # a backoff between tries: there is no condition to poll


def _job_list(job_ids: Iterable[str]) -> list[str]:
    return sorted({job for job in job_ids if job.isdigit()})


def parse_gres_gpus(text: str) -> int | None:
    """The largest GPU count in sinfo's %G output ('gpu:a100:4(S:0-1),gpu:8'), or None."""
    counts = [int(n) for n in _GPU_GRES.findall(text)]
    return max(counts) if counts else None


def partition_gpus_per_node(partition: str | None) -> tuple[int, str] | None:
    """(GPUs per node, source) as sinfo reports them, or None when sinfo is absent, fails or is silent."""
    argv = ["sinfo", "--noheader", "--format=%G"] + (["--partition", partition] if partition else [])
    try:
        gpus = parse_gres_gpus(run(argv, timeout_s=5, attempts=2))
    except SlurmError:
        return None
    if not gpus:
        return None
    return gpus, f"sinfo ({'partition ' + partition if partition else 'default partition'})"


class QueuedJob(NamedTuple):
    """One job as squeue lists it."""

    state: str
    reason: str
    partition: str


def queue_states(job_ids: Iterable[str], timeout_s: float = 15.0,
                 attempts: int = ATTEMPTS) -> dict[str, QueuedJob] | None:
    """{job id: QueuedJob} for the jobs squeue still lists; None when squeue is absent;
    SlurmError when it did not answer (never an empty answer)."""
    wanted = _job_list(job_ids)
    if not wanted:
        return {} if which("squeue") else None
    try:
        text = run(["squeue", "--noheader", "--all", "--format=%i|%T|%r|%P", "--jobs", ",".join(wanted)],
                   timeout_s, attempts=attempts)
    except SlurmMissing:
        return None
    except SlurmError as exc:
        if exc.exit_code is not None and "Invalid job id specified" in exc.reason:
            return {}  # squeue's answer for one job id it no longer knows: it has left the queue
        raise
    jobs: dict[str, QueuedJob] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 4:
            jobs[parts[0]] = QueuedJob(*parts[1:])
    return jobs


def queue_position(job_id: str, partition: str | None = None) -> int | None:
    """1 for the pending job Slurm will start next in ``job_id``'s partition, 2 after it, ...;
    None when squeue is absent or does not say."""
    if not job_id.isdigit():
        return None
    try:
        if partition is None:
            partition = run(["squeue", "--noheader", "--format=%P", "--jobs", job_id]).strip()
        order = run(["squeue", "--noheader", "--all", "--states=PENDING", "--sort=-p,i", "--format=%i",
                     "--partition", partition]).split()
    except SlurmError:
        return None
    return order.index(job_id) + 1 if job_id in order else None


def accounting_states(job_ids: Iterable[str]) -> dict[str, str]:
    """{job id: state} from one sacct call; empty without sacct, accounting, or an answer."""
    wanted = _job_list(job_ids)
    if not wanted:
        return {}
    try:
        text = run(["sacct", "--noheader", "--parsable2", "--allocations", "--format=JobID,State",
                    "--jobs", ",".join(wanted)], timeout_s=10, attempts=2)
    except SlurmError:  # e.g. "Slurm accounting storage is disabled"
        return {}
    pairs = (line.split("|", 1) for line in text.splitlines() if "|" in line)
    return {job: state.split()[0] for job, state in pairs if state}


def scancel(job_id: str, timeout_s: float = 30.0) -> None:
    """Cancel a Slurm job; SlurmError (an HpcServeError) when Slurm refuses or does not answer.
    A job already ending counts as cancelled."""
    try:
        run(["scancel", job_id], timeout_s)
    except SlurmError as exc:
        if "already completing or completed" not in exc.reason:
            raise


def release(job_id: str) -> None:
    """Let a job submitted with ``--hold`` start; SlurmError when Slurm refuses."""
    run(["scontrol", "release", job_id], timeout_s=60)


def requeue(job_id: str) -> str | None:
    """Ask Slurm to requeue ``job_id`` (it ends this run and queues the job again); None when it
    accepted, else its reason."""
    try:
        run(["scontrol", "requeue", job_id], timeout_s=30, repeatable=False)
    except SlurmError as exc:
        return exc.reason
    return None


def sbatch(args: Sequence[str], cwd: str | None = None, env: Mapping[str, str] | None = None,
           timeout_s: float = 60.0) -> str:
    """Submit with ``sbatch --parsable ARGS`` and return the new job's id; SlurmError when it
    fails (a timed-out submission is not repeated: it may have been queued)."""
    out = run(["sbatch", "--parsable", *args], timeout_s, repeatable=False, cwd=cwd, env=env)
    return out.strip().split(";")[0]


def set_comment(job_id: str, text: str, timeout_s: float = 15.0) -> None:
    """Set the job's comment (``squeue -o %k`` shows it). Nothing for a job id that is not
    Slurm's (the local executor) or without scontrol; SlurmError when Slurm refuses."""
    if not job_id.isdigit():
        return
    try:
        run(["scontrol", "update", f"JobId={job_id}", f"Comment={text}"], timeout_s)
    except SlurmMissing:
        return


def user_jobs() -> set[str] | None:
    """The ids of every job of this user that Slurm still has (None when squeue cannot say)."""
    try:
        text = run(["squeue", "--noheader", "--all", "--user", str(os.getuid()), "--format=%i"])
    except SlurmError:
        return None
    return {job.split("_")[0] for job in text.split()}


def job_fields(job_id: str, timeout_s: float = 30.0, attempts: int = ATTEMPTS) -> dict[str, str]:
    """``scontrol show job``'s Key=Value fields of ``job_id``; SlurmError when it cannot say."""
    text = run(["scontrol", "show", "job", "--oneliner", job_id], timeout_s, attempts=attempts)
    return dict(re.findall(r"(\w+)=(\S*)", text))


def parse_duration(text: str) -> float | None:
    """Seconds in Slurm's [D-]HH:MM:SS / MM:SS (squeue's %L); None for UNLIMITED and the like."""
    found = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", text.strip())
    if not found:
        return None
    days, hours, minutes, seconds = (int(part or 0) for part in found.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def time_left(job_id: str) -> float | None:
    """Seconds until ``job_id`` reaches its time limit; None without a limit or squeue;
    SlurmError when squeue does not answer."""
    try:
        return parse_duration(run(["squeue", "--noheader", "--jobs", job_id, "--format=%L"]))
    except SlurmMissing:
        return None


#: sacct's states of a job that is over (anything else of a job squeue no longer lists reads ENDED).
FINAL_STATES = frozenset({"CANCELLED", "COMPLETED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                          "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"})


@dataclass(frozen=True)
class QueueView:
    """What Slurm said of the watched jobs at one moment, or that it did not answer (``error``;
    then nothing is known of any job, and ``silent_for_s`` says for how long)."""

    queued: Mapping[str, QueuedJob] = field(default_factory=dict)
    ended: Mapping[str, str] = field(default_factory=dict)
    error: SlurmError | None = None
    silent_for_s: float = 0.0

    def gone(self, job_id: str) -> bool:
        """Whether Slurm answered, and no longer lists ``job_id``."""
        return self.error is None and job_id not in self.queued

    def state(self, job_id: str) -> str | None:
        """squeue's state of ``job_id``; sacct's (or ENDED) once it has left; None when unknown."""
        if self.error is not None:
            return None
        entry = self.queued.get(job_id)
        return entry.state if entry else self.ended.get(job_id, "ENDED")


class QueueWatcher:
    """Slurm's view of the jobs a process follows: one squeue call for all of them at most once
    per ``interval_s`` (then one sacct call for jobs that left the queue, whose final state is
    kept), shared by status, wait and cancel."""

    def __init__(self, interval_s: float = QUEUE_POLL_S, timeout_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s, self.timeout_s, self.clock = interval_s, timeout_s, clock
        self._jobs: set[str] = set()
        self._asked: set[str] = set()
        self._view: QueueView | None = None
        self._asked_at: float | None = None
        self._silent_since: float | None = None
        self._final: dict[str, str] = {}
        self._positions: dict[str, tuple[float, int | None]] = {}
        self._lock = threading.Lock()

    def watch(self, job_ids: Iterable[str]) -> None:
        """Include these jobs in the next question to Slurm (without asking now)."""
        with self._lock:
            self._jobs.update(_job_list(job_ids))

    def look(self, job_ids: Iterable[str] = ()) -> QueueView | None:
        """The latest view of ``job_ids`` (and every job watched before); None when squeue is
        not installed. Asks Slurm when the last answer is older than the interval, or lacks a
        job (then after the rest of the interval)."""
        with self._lock:
            self._jobs.update(_job_list(job_ids))
            if self._asked_at is not None:
                age = self.clock() - self._asked_at
                if age < self.interval_s:
                    if self._jobs <= self._asked:
                        return self._view
                    time.sleep(self.interval_s - age)  # the rate limit: a new job waits its turn
            return self._ask()

    def _ask(self) -> QueueView | None:
        now, jobs = self.clock(), set(self._jobs)
        self._asked_at, self._asked = now, jobs
        try:
            queued = queue_states(jobs, self.timeout_s, attempts=2)
        except SlurmError as exc:
            self._silent_since = self._silent_since if self._silent_since is not None else now
            self._view = QueueView(error=exc, silent_for_s=self.clock() - self._silent_since)
            return self._view
        self._silent_since = None
        if queued is None:
            self._view = None
            return None
        left = jobs - set(queued) - set(self._final)
        if left:
            self._final.update((job, state) for job, state in accounting_states(left).items()
                               if state in FINAL_STATES)
        self._view = QueueView(queued=queued, ended={job: self._final[job] for job in jobs - set(queued)
                                                     if job in self._final})
        return self._view

    def position(self, job_id: str) -> int | None:
        """``job_id``'s place among the pending jobs of its partition (see queue_position), asked
        at most once per interval; None unless the last view has it PENDING."""
        with self._lock:
            entry = self._view.queued.get(job_id) if self._view is not None else None
            if entry is None or entry.state != "PENDING":
                return None
            now = self.clock()
            asked = self._positions.get(job_id)
            if asked is None or now - asked[0] >= self.interval_s:
                asked = self._positions[job_id] = (now, queue_position(job_id, entry.partition))
            return asked[1]


_WATCHER = QueueWatcher()


def queue_watcher() -> QueueWatcher:
    """This process's queue watcher (status, wait and cancel share it)."""
    return _WATCHER
