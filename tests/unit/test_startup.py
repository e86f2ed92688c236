"""Where the start-up time went, read from a registry laid out as the agents write it and a real
node log (vLLM's CPU build, captured: tests/unit/node_logs/ready-cpu-node-0.log)."""

import io
import time
from contextlib import redirect_stdout
from pathlib import Path

from hpc_serve.client import control
from hpc_serve.client.startup import startup_phases, vllm_milestones
from hpc_serve.cli import views
from hpc_serve.registry import JOB, Registry

LOG = (Path(__file__).parent / "node_logs" / "ready-cpu-node-0.log").read_text()


def local(text: str) -> float:
    """A node log's local time ("2026-12-02 18:01:30") as a timestamp."""
    return time.mktime(time.strptime(text, "%Y-%m-%d %H:%M:%S"))


def registry_with(tmp_path, marks: dict, submitted: float | None, restart: int = 0):
    registry = Registry(str(tmp_path))
    dep = registry.deployment("60")
    dep.ensure()
    dep.write(JOB, {"job_id": "60", "name": "t", "submitted": submitted} if submitted else {"job_id": "60"})
    dep.set_phase("READY", "serving")
    if restart:
        dep.set_phase("READY", "serving", restart=restart)
    for folder in ("logs", "timings"):
        (Path(dep.path) / folder).mkdir(exist_ok=True)
    Path(dep.log_path(0)).write_text(LOG)
    dep.write(dep.rank_file("timings", 0), marks)
    return dep


def test_vllms_milestones_come_from_its_own_lines_in_the_last_run():
    found = vllm_milestones(LOG, local("2026-12-02 18:01:01"))
    assert [name for name, _ in found] == ["weights loaded", "engine initialised (profile, KV cache, warm-up)",
                                           "API server up"]
    assert [at for _, at in found] == [local("2026-12-02 18:01:30"), local("2026-12-02 18:01:32"),
                                       local("2026-12-02 18:01:33")]
    second_run = LOG + "\n2026-12-02T18:05:00 node 0: started vllm (pid 1): ...\n"
    assert vllm_milestones(second_run, local("2026-12-02 18:05:00")) == []  # that run has not got there


def test_the_phases_are_consecutive_and_add_up_to_submission_to_ready(tmp_path):
    start = local("2026-12-02 18:01:01")
    marks = {"job_start": start - 0.2, "agent_start": start - 0.05, "vllm_started": start, "ready": start + 33.4}
    dep = registry_with(tmp_path, marks, submitted=start - 5.0)
    phases = startup_phases(dep)
    assert [name for name, _ in phases] == [
        "queued", "agents started", "engine launched", "weights loaded",
        "engine initialised (profile, KV cache, warm-up)", "API server up", "READY (health and model checks)"]
    assert abs(sum(seconds for _, seconds in phases) - 38.4) < 1e-6
    assert all(seconds >= 0 for _, seconds in phases)
    assert abs(dict(phases)["queued"] - 4.8) < 1e-6 and abs(dict(phases)["weights loaded"] - 29.0) < 1e-6
    row = control.status("60", str(tmp_path))
    assert row.to_dict()["startup"][0] == {"phase": "queued", "seconds": 4.8}
    shown = io.StringIO()
    with redirect_stdout(shown):
        views.status_table([row])
    assert "start-up, 38.4 s to READY:" in shown.getvalue() and "29.0 s  weights loaded" in shown.getvalue()


def test_after_a_restart_it_counts_from_that_runs_agent_and_before_ready_it_says_nothing(tmp_path):
    start = local("2026-12-02 18:01:01")
    dep = registry_with(tmp_path, {"agent_start": start - 1, "vllm_started": start, "ready": start + 34},
                        submitted=start - 100, restart=1)
    phases = startup_phases(dep)
    assert phases[0][0] == "engine launched" and abs(sum(s for _, s in phases) - 35) < 1e-6
    dep.write(dep.rank_file("timings", 0), {"agent_start": start, "vllm_started": start})
    assert startup_phases(dep) == ()


def test_on_the_sbatch_path_the_agents_job_record_is_not_taken_for_the_submission(tmp_path):
    start = local("2026-12-02 18:01:01")
    marks = {"job_start": start - 0.2, "agent_start": start - 0.05, "vllm_started": start, "ready": start + 33.4}
    dep = registry_with(tmp_path, marks, submitted=start - 0.04)  # written by node 0's agent, after the start
    phases = startup_phases(dep)
    assert phases[0][0] == "agents started" and abs(sum(s for _, s in phases) - 33.6) < 1e-6
