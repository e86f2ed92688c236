"""What the cluster benchmarks share: polling with a timeout, emptying the queue, writing results."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def wait_until(condition, timeout: float, what: str, poll: float = 0.1):
    """Poll ``condition`` until it returns something truthy (returned); RuntimeError on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def queue_empty(env: dict) -> bool:
    return not subprocess.run(["squeue", "--noheader"], env=env, capture_output=True, text=True).stdout.strip()


def cancel_all(env: dict) -> None:
    """scancel every job and wait until the queue is empty."""
    subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True)
    wait_until(lambda: queue_empty(env), 60, "the queue to empty")


def run_folder(cluster, name: str) -> Path:
    """A new folder on the cluster's shared path for this invocation: job ids restart with every
    cluster, so output files of an earlier run must never be found by a later one."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix=f"bench-{name}-{time.strftime('%Y%m%d-%H%M%S')}-",
                                 dir=cluster.shared_dir))


def write_results(name: str, text: str, data: dict) -> None:
    """Print the table and write results/<name>.md and results/<name>.json."""
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.md").write_text(text)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
