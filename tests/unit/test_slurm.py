"""The one Slurm runner and the queue watcher, against small fake Slurm tools on PATH.

The fakes are shell scripts that print fixed answers, fail a given number of times, or sleep past
the timeout; they test our logic (retries, error kinds, the rate limit, "gone" versus "no
answer"). Slurm's real behaviour is tested in tests/cluster.
"""

import threading
import time
from pathlib import Path

import pytest

from hpc_serve import slurm
from hpc_serve.client import control
from hpc_serve.registry import CANCEL, JOB, NODES, Registry

SOCKET_TIMEOUT = "slurm_load_jobs error: Socket timed out on send/recv operation"
NO_CONTROLLER = "slurm_load_jobs error: Unable to contact slurm controller (connect failure)"


def script_tool(folder: Path, name: str, body: str) -> None:
    """An executable ``name`` running the shell ``body``; each call is counted in NAME.count
    (replaced whole, so that a reader never sees it half written; the body sees the count as $n)
    and its arguments appended to NAME.args."""
    script = folder / name
    script.write_text(f"""#!/bin/sh
c="{folder}/{name}.count"; n=0; [ -f "$c" ] && read n < "$c"; n=$((n+1)); echo "$n" > "$c.$$" && /bin/mv "$c.$$" "$c"
echo "$@" >> "{folder}/{name}.args"
{body}
""")
    script.chmod(0o755)


def fake_tool(folder: Path, name: str, out: str = "", fail_times: int = 0, err: str = "", code: int = 1,
              sleep_s: float = 0, fail_until: Path | None = None) -> None:
    """A tool that fails (``err`` on stderr, exit ``code``) on its first ``fail_times`` calls, or
    until the file ``fail_until`` exists, then prints ``out``; it may first sleep."""
    failing = f'[ "$n" -le {fail_times} ]' + (f' || [ ! -e "{fail_until}" ]' if fail_until else "")
    script_tool(folder, name, f"""{f'/bin/sleep {sleep_s}' if sleep_s else ''}
if {failing}; then printf '%b\\n' '{err}' >&2; exit {code}; fi
printf '%s' '{out}'""")


def calls(folder: Path, name: str) -> int:
    path = folder / f"{name}.count"
    return int(path.read_text()) if path.exists() else 0


@pytest.fixture
def bin_dir(tmp_path, monkeypatch):
    """A PATH holding only the fakes (the machine's own Slurm, if any, is out of reach)."""
    folder = tmp_path / "bin"
    folder.mkdir()
    monkeypatch.setenv("PATH", str(folder))
    monkeypatch.setattr(slurm, "BACKOFF_S", 0.01)
    monkeypatch.setattr(slurm, "_WATCHER", slurm.QueueWatcher(interval_s=0.2))
    return folder


def test_run_returns_stdout(bin_dir):
    fake_tool(bin_dir, "sinfo", out="gpu:8\n")
    assert slurm.run(["sinfo", "--noheader"]) == "gpu:8\n"
    assert (bin_dir / "sinfo.args").read_text() == "--noheader\n"


def test_a_transient_failure_is_retried_until_it_answers(bin_dir):
    fake_tool(bin_dir, "squeue", out="7|RUNNING|None|gpu\n", fail_times=2, err=SOCKET_TIMEOUT)
    assert slurm.run(["squeue"], attempts=3) == "7|RUNNING|None|gpu\n"
    assert calls(bin_dir, "squeue") == 3


def test_a_lasting_transient_failure_names_the_command_code_and_last_line(bin_dir):
    fake_tool(bin_dir, "squeue", fail_times=99, err=f"some detail\\n{NO_CONTROLLER}")
    with pytest.raises(slurm.SlurmError) as raised:
        slurm.run(["squeue", "--jobs", "7"], attempts=3)
    error = raised.value
    assert calls(bin_dir, "squeue") == 3
    assert error.transient and error.exit_code == 1 and error.reason == NO_CONTROLLER
    assert error.problem == f"squeue --jobs 7 failed (exit code 1): {NO_CONTROLLER}"


def test_a_refusal_is_not_retried(bin_dir):
    fake_tool(bin_dir, "sbatch", fail_times=99,
              err="sbatch: error: Batch job submission failed: Invalid partition name specified")
    with pytest.raises(slurm.SlurmError) as raised:
        slurm.sbatch(["job.sbatch"])
    assert calls(bin_dir, "sbatch") == 1
    assert not raised.value.transient and raised.value.reason.endswith("Invalid partition name specified")


def test_a_timeout_is_transient_and_retried(bin_dir):
    fake_tool(bin_dir, "squeue", sleep_s=5)
    begun = time.monotonic()
    with pytest.raises(slurm.SlurmError) as raised:
        slurm.run(["squeue"], timeout_s=0.3, attempts=2)
    assert time.monotonic() - begun < 3
    assert raised.value.transient and raised.value.exit_code is None and "no answer within 0.3 s" in raised.value.reason
    assert calls(bin_dir, "squeue") == 2


def test_a_submission_that_may_have_been_queued_is_not_repeated(bin_dir):
    fake_tool(bin_dir, "sbatch", out="123", sleep_s=5)
    with pytest.raises(slurm.SlurmError) as raised:
        slurm.sbatch(["job.sbatch"], timeout_s=0.3)
    assert raised.value.transient and calls(bin_dir, "sbatch") == 1  # a second try could queue it twice


def test_a_submission_that_never_reached_the_controller_is_repeated(bin_dir):
    fake_tool(bin_dir, "sbatch", out="123;cluster\n", fail_times=1,
              err="sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)")
    assert slurm.sbatch(["--hold", "job.sbatch"]) == "123"
    assert calls(bin_dir, "sbatch") == 2
    assert (bin_dir / "sbatch.args").read_text().splitlines()[-1] == "--parsable --hold job.sbatch"


def test_scancel_exit_code_of_a_silent_comm_error_is_transient(bin_dir):
    fake_tool(bin_dir, "scancel", fail_times=99, code=8)  # 1800 (connect failure) modulo 256
    with pytest.raises(slurm.SlurmError) as raised:
        slurm.scancel("7")
    assert raised.value.transient and calls(bin_dir, "scancel") == slurm.ATTEMPTS


def test_scancel_of_a_job_already_ending_is_done(bin_dir):
    fake_tool(bin_dir, "scancel", fail_times=99,
              err="scancel: error: Kill job error on job id 7: Job/step already completing or completed")
    slurm.scancel("7")
    assert calls(bin_dir, "scancel") == 1


def test_slurm_missing_is_its_own_case(bin_dir):
    with pytest.raises(slurm.SlurmMissing) as raised:
        slurm.run(["squeue"])
    assert raised.value.problem == "squeue is not on PATH." and isinstance(raised.value, slurm.SlurmError)
    assert slurm.queue_states(["7"]) is None and slurm.user_jobs() is None
    assert slurm.partition_gpus_per_node("gpu") is None and slurm.time_left("7") is None
    assert slurm.requeue("7") == "scontrol is not on PATH"
    slurm.set_comment("7", "http://x")  # nothing to set without Slurm
    with pytest.raises(slurm.SlurmMissing):
        slurm.scancel("7")


def test_the_old_return_conventions_of_the_agents_calls(bin_dir):
    fake_tool(bin_dir, "squeue", out="7\n8_1\n8_2\n")
    assert slurm.user_jobs() == {"7", "8"}
    fake_tool(bin_dir, "scontrol", fail_times=99, err="scontrol: error: Requested operation is presently disabled")
    assert slurm.requeue("7") == "scontrol: error: Requested operation is presently disabled"
    with pytest.raises(slurm.SlurmError):
        slurm.set_comment("7", "http://x")
    with pytest.raises(slurm.SlurmError):
        slurm.job_fields("7")


def test_queue_states_and_a_job_id_squeue_no_longer_knows(bin_dir):
    fake_tool(bin_dir, "squeue", out="7|PENDING|Priority|gpu\n8|RUNNING|None|cpu\n")
    assert slurm.queue_states(["8", "7", "local-1"]) == {
        "7": slurm.QueuedJob("PENDING", "Priority", "gpu"), "8": slurm.QueuedJob("RUNNING", "None", "cpu")}
    assert (bin_dir / "squeue.args").read_text().split()[-1] == "7,8"
    fake_tool(bin_dir, "squeue", fail_times=99, err="slurm_load_jobs error: Invalid job id specified")
    assert slurm.queue_states(["9"]) == {}


def test_job_fields_and_time_left(bin_dir):
    fake_tool(bin_dir, "scontrol", out="JobId=7 JobName=x Restarts=2 TimeLimit=01:00:00 Comment=(null)\n")
    assert slurm.job_fields("7") == {"JobId": "7", "JobName": "x", "Restarts": "2", "TimeLimit": "01:00:00",
                                     "Comment": "(null)"}
    fake_tool(bin_dir, "squeue", out="1-00:02:03\n")
    assert slurm.time_left("7") == 86400 + 123


def test_the_watcher_asks_slurm_at_most_once_per_interval(bin_dir):
    fake_tool(bin_dir, "squeue", out="7|RUNNING|None|gpu\n")
    watcher = slurm.QueueWatcher(interval_s=2.0)
    views = [watcher.look(["7"]) for _ in range(50)]
    assert calls(bin_dir, "squeue") == 1
    assert all(view.state("7") == "RUNNING" and not view.gone("7") for view in views)


def test_a_new_job_waits_for_the_rest_of_the_interval(bin_dir):
    fake_tool(bin_dir, "squeue", out="7|RUNNING|None|gpu\n8|PENDING|None|gpu\n")
    watcher = slurm.QueueWatcher(interval_s=0.5)
    watcher.look(["7"])
    begun = time.monotonic()
    assert watcher.look(["8"]).state("8") == "PENDING"
    assert time.monotonic() - begun >= 0.45 and calls(bin_dir, "squeue") == 2
    assert (bin_dir / "squeue.args").read_text().split()[-1] == "7,8"  # one question for both


def test_no_answer_is_never_an_end(bin_dir):
    fake_tool(bin_dir, "squeue", fail_times=2, err=SOCKET_TIMEOUT)  # then: an empty queue
    fake_tool(bin_dir, "sacct", out="7|CANCELLED by 1000\n")
    watcher = slurm.QueueWatcher(interval_s=0.05)
    silent = watcher.look(["7"])
    assert silent.error is not None and silent.error.transient
    assert not silent.gone("7") and silent.state("7") is None and calls(bin_dir, "sacct") == 0
    time.sleep(0.06)
    answered = watcher.look(["7"])
    assert answered.error is None and answered.gone("7") and answered.state("7") == "CANCELLED"
    time.sleep(0.06)
    assert watcher.look(["7"]).state("7") == "CANCELLED" and calls(bin_dir, "sacct") == 1  # final: kept


def test_the_silence_is_timed_from_the_first_unanswered_question(bin_dir):
    fake_tool(bin_dir, "squeue", out="7|RUNNING|None|gpu\n", fail_times=4, err=NO_CONTROLLER)
    now = [100.0]
    watcher = slurm.QueueWatcher(interval_s=2.0, clock=lambda: now[0])
    assert watcher.look(["7"]).silent_for_s == 0  # two tries per question: calls 1-2 fail
    now[0] += 30
    assert watcher.look(["7"]).silent_for_s == 30  # calls 3-4 fail
    now[0] += 30
    view = watcher.look(["7"])
    assert view.error is None and view.silent_for_s == 0 and view.state("7") == "RUNNING"


def test_a_job_without_accounting_that_left_the_queue_reads_ended(bin_dir):
    fake_tool(bin_dir, "squeue")
    fake_tool(bin_dir, "sacct", fail_times=99, err="Slurm accounting storage is disabled")
    view = slurm.QueueWatcher().look(["7"])
    assert view.gone("7") and view.state("7") == "ENDED"


def test_the_queue_position_is_asked_at_most_once_per_interval(bin_dir):
    watcher = slurm.QueueWatcher(interval_s=2.0)
    fake_tool(bin_dir, "squeue", out="7|PENDING|Priority|gpu\n")
    watcher.look(["7"])
    fake_tool(bin_dir, "squeue", out="5\n7\n")
    assert [watcher.position("7") for _ in range(5)] == [2] * 5
    assert calls(bin_dir, "squeue") == 2
    assert (bin_dir / "squeue.args").read_text().splitlines()[-1].endswith("--partition gpu")


def registered(tmp_path, monkeypatch, job_id="7", nodes=0):
    monkeypatch.setenv("HPC_SERVE_HOME", str(tmp_path / "home"))
    dep = Registry(str(tmp_path / "home")).deployment(job_id).ensure()
    dep.write(JOB, {"job_id": job_id, "slurm_job_id": job_id, "executor": "slurm", "submitted": time.time()})
    dep.init_phase("LOADING", "vLLM starting")
    for rank in range(nodes):
        dep.write(dep.rank_file(NODES, rank), {"hostname": f"node{rank}", "restart": 0})
    return dep


def test_status_of_a_job_slurm_does_not_answer_for_is_live_and_unknown(bin_dir, tmp_path, monkeypatch):
    registered(tmp_path, monkeypatch)
    fake_tool(bin_dir, "squeue", fail_times=99, err=SOCKET_TIMEOUT)
    row = control.status("7")
    assert row.slurm_state == control.SLURM_SILENT and row.live


def test_cancel_waits_for_the_agents_end_and_polls_slurm_at_most_every_interval(bin_dir, tmp_path, monkeypatch):
    dep = registered(tmp_path, monkeypatch, nodes=1)
    left = tmp_path / "left"
    monkeypatch.setattr(slurm, "_WATCHER", slurm.QueueWatcher(interval_s=slurm.QUEUE_POLL_S))
    fake_tool(bin_dir, "scancel")
    fake_tool(bin_dir, "sacct", out="7|CANCELLED\n")
    # squeue lists the job until the file `left` exists, then answers with an empty queue
    script_tool(bin_dir, "squeue", f'[ -e "{left}" ] || echo "7|RUNNING|None|gpu"')

    def agent():  # the node agents' part: they record their end, then the job leaves the queue
        deadline = time.monotonic() + 10
        while not Path(dep.file(CANCEL)).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        dep.set_phase("STOPPED", "cancelled (hpc-serve cancel)")
        left.touch()

    thread = threading.Thread(target=agent)
    thread.start()
    begun = time.monotonic()
    row = control.cancel("7")
    elapsed = time.monotonic() - begun
    thread.join()
    assert row.phase == "STOPPED" and dep.state["reason"] == "cancelled (hpc-serve cancel)"
    assert calls(bin_dir, "scancel") == 1
    assert calls(bin_dir, "squeue") <= 2 + elapsed / slurm.QUEUE_POLL_S  # not five times a second
    assert elapsed < 2 * slurm.QUEUE_POLL_S + 1.5


def test_an_scancel_timeout_in_the_hand_over_is_reported_not_raised(bin_dir, tmp_path, monkeypatch):
    from hpc_serve.node.renew import cancel_replaced_job

    dep = registered(tmp_path, monkeypatch)
    dep.set_phase("STOPPED", "replaced by its successor 8, READY at http://n:1")
    fake_tool(bin_dir, "scancel", sleep_s=5)
    logged = []
    assert cancel_replaced_job(dep, "7", logged.append, timeout_s=0.3) is False
    assert calls(bin_dir, "scancel") == slurm.ATTEMPTS  # a timed-out scancel is asked again
    assert dep.phase == "STOPPED"
    assert dep.state["reason"] == ("replaced by its successor 8, READY at http://n:1\n(could not cancel job 7: "
                                   "scancel 7 failed (no exit code): no answer within 0.3 s)")
    assert logged == ["--auto-renew: could not cancel job 7: scancel 7 failed (no exit code): no answer within 0.3 s"]
    fake_tool(bin_dir, "scancel")
    assert cancel_replaced_job(dep, "7", logged.append) is True
