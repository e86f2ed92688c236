"""The wait's own logic: progress lines, the failure reason shown from a vLLM log, and waiting
through a Slurm that does not answer (fake squeue/sacct on PATH, see test_slurm.py)."""

import threading
import time

import pytest

from hpc_serve.client.control import DeploymentStatus
from hpc_serve.node.logs import exit_reason, root_error
from hpc_serve.client.waiting import Progress, WaitFailed, wait_ready

from .test_slurm import SOCKET_TIMEOUT, bin_dir, calls, fake_tool, registered  # noqa: F401 (bin_dir: a fixture)


def status(slurm="RUNNING", phase="LOADING", reason=""):
    return DeploymentStatus(id="7", name="n", model="m", layout="1x1", slurm_state=slurm, phase=phase,
                            reason=reason, endpoint="", age_s=1.0, nodes_reported=1)


@pytest.mark.parametrize("position,text", [(1, "1st"), (2, "2nd"), (3, "3rd"), (4, "4th"), (11, "11th"),
                                           (12, "12th"), (21, "21st"), (103, "103rd")])
def test_queued_line_names_the_reason_and_position(position, text):
    line = Progress(status("PENDING (Priority)", "PENDING"), position, None, 3.0).line()
    assert line == f"queued: PENDING (Priority), {text} in the queue"


def test_queued_without_a_position():
    assert Progress(status("PENDING (Resources)", "PENDING"), None, None, 0).line() == \
        "queued: PENDING (Resources)"


def test_a_running_job_whose_agents_have_not_written_yet():
    assert Progress(status("RUNNING", "PENDING", "submitted"), None, 0.5, 2.0).line() == \
        "RUNNING: the job has started; waiting for its node agents"


def test_running_line_shows_the_phase_and_the_first_line_of_its_reason():
    row = status(phase="FAILED", reason="vllm exited with code 1: ValueError: x\nlast lines:\n...")
    assert Progress(row, None, 5.0, 9.0).line() == "FAILED: vllm exited with code 1: ValueError: x"


VLLM_LOG = """\
(APIServer pid=1) WARNING 11-28 08:48:14 [system_utils.py:255] fd limit errors like `OSError: [Errno 24] Too many`
(EngineCore pid=2) ERROR 11-28 08:48:49 [core.py:1510] Traceback (most recent call last):
(EngineCore pid=2) ERROR 11-28 08:48:49 [core.py:1510]     raise ValueError(
(EngineCore pid=2) ERROR 11-28 08:48:49 [core.py:1510] ValueError: current platform cpu does not support ray.
Traceback (most recent call last):
RuntimeError: Engine core initialization failed. See root cause above.
"""


def test_the_root_error_is_the_first_exception_line_without_vllms_prefix(tmp_path):
    log = tmp_path / "node-0.log"
    log.write_text(VLLM_LOG)
    assert root_error(str(log)) == "ValueError: current platform cpu does not support ray."
    reason = exit_reason("vllm", "node 0 (node1)", 1, str(log))
    assert reason.splitlines()[:2] == ["vllm on node 0 (node1) exited with code 1: this vLLM build (cpu) "
                                       "cannot run its workers on Ray: pass --launcher mp",
                                       "root error: ValueError: current platform cpu does not support ray."]
    assert reason.splitlines()[-1].startswith("RuntimeError: Engine core")
    log.write_text(VLLM_LOG.replace("current platform cpu does not support ray", "nothing the catalogue knows"))
    assert exit_reason("vllm", "node 0 (node1)", 1, str(log)).splitlines()[0] == (
        "vllm on node 0 (node1) exited with code 1: ValueError: nothing the catalogue knows.")


def test_a_log_without_an_exception_gives_the_exit_code_alone(tmp_path):
    log = tmp_path / "node-0.log"
    log.write_text("Killed\n")
    assert exit_reason("vllm", "node 1 (node2)", -9, str(log)).splitlines()[0] == \
        "vllm on node 1 (node2) exited with code -9"
    assert root_error(str(tmp_path / "missing.log")) is None


def test_a_requeued_deployment_says_it_is_queued_again_and_why_it_waits():
    row = status("PENDING (BeginTime)", "RESTARTING", "restart 1 of 2, after: vllm exited")
    assert Progress(row, 1, None, 3.0).line() == \
        "RESTARTING: queued again: PENDING (BeginTime) (Slurm holds a requeued job about 2 minutes)"
    running = status("RUNNING", "RESTARTING", "requeued by Slurm (preemption)\nmore")
    assert Progress(running, None, None, 3.0).line() == "RESTARTING: requeued by Slurm (preemption)"


def test_a_silent_slurm_is_said_and_the_wait_goes_on():
    line = Progress(status("UNKNOWN (Slurm is not answering)", "PENDING"), None, None, 3.0, SOCKET_TIMEOUT).line()
    assert line == (f"PENDING: no node agent has started yet; Slurm is not answering ({SOCKET_TIMEOUT}), "
                    "still waiting (up to 5 min without an answer)")
    loading = Progress(status("UNKNOWN (Slurm is not answering)"), None, 9.0, 12.0, "no answer within 10 s").line()
    assert loading.startswith("LOADING; Slurm is not answering (no answer within 10 s)")


def test_a_transient_squeue_failure_does_not_fail_the_wait(bin_dir, tmp_path, monkeypatch):
    dep = registered(tmp_path, monkeypatch)
    ready = tmp_path / "ready"
    fake_tool(bin_dir, "squeue", out="7|RUNNING|None|gpu\n", err=SOCKET_TIMEOUT, fail_until=ready)
    fake_tool(bin_dir, "sacct", fail_times=99, err="Slurm accounting storage is disabled")

    def agents():  # they serve while squeue still fails: READY, and then Slurm answers again
        deadline = time.monotonic() + 20
        while calls(bin_dir, "squeue") < 6 and time.monotonic() < deadline:
            time.sleep(0.02)
        dep.set_phase("READY", "serving")
        ready.touch()

    thread = threading.Thread(target=agents)
    thread.start()
    seen = []
    row = wait_ready("7", on_update=seen.append)
    thread.join()
    assert row.phase == "READY" and calls(bin_dir, "sacct") == 0
    assert any("Slurm is not answering" in progress.line() for progress in seen)


def test_the_wait_gives_up_after_slurm_has_been_silent_for_its_patience(bin_dir, tmp_path, monkeypatch):
    registered(tmp_path, monkeypatch)
    fake_tool(bin_dir, "squeue", fail_times=999, err=SOCKET_TIMEOUT)
    with pytest.raises(WaitFailed, match=r"Slurm has not answered for \d+ s \(slurm_load_jobs error: Socket"):
        wait_ready("7", slurm_patience_s=1.0)


def test_the_wait_fails_once_the_job_has_really_left_the_queue(bin_dir, tmp_path, monkeypatch):
    registered(tmp_path, monkeypatch)
    fake_tool(bin_dir, "squeue")  # answers: the job is not in the queue
    fake_tool(bin_dir, "sacct", out="7|FAILED\n")
    with pytest.raises(WaitFailed, match="Job 7 left the queue before serving"):
        wait_ready("7", timeout_s=60)
