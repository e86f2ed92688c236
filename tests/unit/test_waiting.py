"""The wait's own logic: progress lines, and the failure reason shown from a vLLM log."""

import pytest

from hpc_serve.client.control import DeploymentStatus
from hpc_serve.node.engine import exit_reason, root_error
from hpc_serve.client.waiting import Progress


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
    assert reason.splitlines()[0] == ("vllm on node 0 (node1) exited with code 1: "
                                      "ValueError: current platform cpu does not support ray.")
    assert reason.splitlines()[-1].startswith("RuntimeError: Engine core")


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
