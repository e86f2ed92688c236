"""Bad input end to end, through the CLI against the running cluster: each is one clear error with
exit code 2, nothing reaches the queue, and nothing in the registry changes."""

import hashlib

import pytest

from .helpers import read_state, run_cli, squeue_ids, wait_for

pytestmark = pytest.mark.cluster
OK = ["org/tiny", "--gpus-per-node", "8", "--launcher", "mp", "--no-wait"]
BAD_SUBMITS = {
    "layout leaves GPUs idle": ["--tp", "3"],
    "time": ["--time", "soon"],
    "secret in --env": ["--env", "HF_TOKEN=hf_x"],
    "privileged port": ["--port", "80"],
    "restarts out of range": ["--max-restarts", "-1"],
    "restarts without Slurm": ["--max-restarts", "1", "--executor", "local"],
    "vLLM argument against the layout": ["--", "--tensor-parallel-size", "2"],
    "shell characters in a directive": ["--partition", "a;b"],
    "missing container image": ["--container", "/nonexistent/image.sif"],
    "unknown profile": ["--profile", "nosuch"],
}


def snapshot(home) -> dict[str, str]:
    """Every registry file's digest, except the agents' heartbeats."""
    return {str(path.relative_to(home)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(home.rglob("*")) if path.is_file() and "beats" not in path.parts}


def check_one_clear_error(done, name: str) -> None:
    assert done.returncode == 2, (name, done.returncode, done.stdout, done.stderr)
    lines = [line for line in done.stderr.strip().splitlines() if not line.startswith("warning:")]
    assert lines and lines[0].startswith("error: ") and len(lines) <= 2, (name, done.stderr)
    assert "Traceback" not in done.stderr


def test_bad_input_never_reaches_the_queue_and_loses_nothing(cluster, home, tmp_path):
    live = run_cli("submit", *OK, "--name", "keeper")
    assert live.returncode == 0, live.stderr
    live_id = live.stdout.split()[1]
    wait_for(lambda: read_state(home, live_id).get("phase") == "LOADING", 60, "the live deployment to load")
    before, queue = snapshot(home), squeue_ids(cluster)
    for name, extra in BAD_SUBMITS.items():
        check_one_clear_error(run_cli("submit", *OK, *extra), name)
    check_one_clear_error(run_cli("submit", "--gpus-per-node", "8", "--no-wait"), "no model")
    dense = tmp_path / "dense-model"
    dense.mkdir()
    (dense / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    check_one_clear_error(run_cli("submit", str(dense), *OK[1:], "--ep"), "--ep on a dense model")
    for command in (["endpoint", live_id], ["tunnel", live_id, "--via", "login"], ["smoke", live_id],
                    ["wait", "999999"], ["cancel", "999999"], ["logs", "999999"], ["status", "999999"],
                    ["logs", live_id, "--node", "7"]):
        check_one_clear_error(run_cli(*command), " ".join(command))
    assert squeue_ids(cluster) == queue
    assert snapshot(home) == before
    assert read_state(home, live_id)["phase"] == "LOADING"
