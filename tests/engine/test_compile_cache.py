"""The compile cache on the real cluster with real vLLM (torch.compile, no --enforce-eager): two
deployments starting at once on one fresh cache both serve, and the next start looks for its
compiled graphs under the same key in the same per-user folder. (vLLM 0.32's CPU build then saves
its AOT artifacts again rather than loading them; on a GPU, tests/gpu shows the next start
loading them: "Directly load the compiled graph(s) ... from the cache".)"""

import re

import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ..cluster.helpers import job_processes, run_cli, wait_for
from .test_engine import VLLM_ARGS, wait_phase
from .test_faults import chat_through_the_api

pytestmark = pytest.mark.engine
ENTRY = re.compile(r"(?:saved AOT compiled function to|Directly load AOT compilation from path) (\S+)")


def cache_entries(home, job_id: str) -> set[str]:
    """The compile cache entries (folders keyed by vLLM's hash) that a deployment's vLLM used."""
    return set(ENTRY.findall((home / "deployments" / job_id / "logs" / "node-0.log").read_text()))


def test_two_starts_at_once_share_the_cache_and_the_next_one_loads_from_it(cluster, home, vllm_env):
    cache = Path(cluster.shared_dir) / f"compile-cache-{uuid.uuid4().hex[:8]}"

    def submit(name: str) -> str:
        done = run_cli("submit", "--no-wait", vllm_env.model, "--gpus-per-node", "1", "--exclusive",
                       "--launcher", "mp", "--name", name, "--cache-dir", str(cache),
                       "--engine-cmd", vllm_env.engine_cmd, "--env", "VLLM_CPU_KVCACHE_SPACE=1", *VLLM_ARGS)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()[1]

    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(submit, ("cache-a", "cache-b"))
    for job_id in (first, second):
        state = wait_phase(home, job_id, ("READY", "FAILED"), 600)
        assert state["phase"] == "READY", state["reason"]
        assert chat_through_the_api(home, job_id) in ("length", "stop")
    assert (cache / "torch_compile_cache").is_dir(), list(cache.iterdir())
    for job_id in (first, second):
        assert run_cli("cancel", job_id).returncode == 0

    third = submit("cache-c")
    state = wait_phase(home, third, ("READY", "FAILED"), 600)
    assert state["phase"] == "READY", state["reason"]
    used = [cache_entries(home, job_id) for job_id in (first, second, third)]
    assert used[0] and used[0] == used[1] == used[2], used  # one key: the same model and layout
    assert all(entry.startswith(str(cache)) for entry in used[2]), used[2]
    assert chat_through_the_api(home, third) in ("length", "stop")
    assert run_cli("cancel", third).returncode == 0
    wait_for(lambda: not any(job_processes(cluster).values()), 20, f"no process left ({job_processes(cluster)})")
