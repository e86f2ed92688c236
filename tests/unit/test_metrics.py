"""Live metrics from vLLM's /metrics text: parsed per engine, rates from two samples."""

from pathlib import Path

import pytest

from hpc_serve.client.metrics import EngineLoad, live_load, load_from, parse

CAPTURED = Path(__file__).resolve().parent / "metrics"


def sample(running: int, waiting: int, kv: float, prompt: float, generated: float, engine: str = "0") -> str:
    labels = f'engine="{engine}",model_name="/models/tiny"'
    return (f"# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
            f"# TYPE vllm:num_requests_running gauge\n"
            f"vllm:num_requests_running{{{labels}}} {running:.1f}\n"
            f"vllm:num_requests_waiting{{{labels}}} {waiting:.1f}\n"
            f"vllm:kv_cache_usage_perc{{{labels}}} {kv}\n"
            f"vllm:prompt_tokens_total{{{labels}}} {prompt}\n"
            f"vllm:prompt_tokens_created{{{labels}}} 1.7e9\n"
            f"vllm:generation_tokens_total{{{labels}}} {generated}\n")


def test_a_captured_metrics_page_of_vllm_cpu_is_read():
    """A whole page of the vLLM CPU build's /metrics, taken between two requests of a load."""
    found = parse((CAPTURED / "vllm-cpu-under-load.txt").read_text())
    assert found == {"vllm:num_requests_running": {"0": 0.0}, "vllm:num_requests_waiting": {"0": 0.0},
                     "vllm:kv_cache_usage_perc": {"0": 0.0}, "vllm:prompt_tokens_total": {"0": 6.0},
                     "vllm:generation_tokens_total": {"0": 1200.0}}


def test_rates_come_from_two_samples_per_engine():
    first = parse(sample(1, 0, 0.1, 100, 1000) + sample(0, 0, 0.0, 50, 500, engine="1"))
    second = parse(sample(2, 1, 0.25, 150, 1400) + sample(1, 0, 0.05, 50, 600, engine="1"))
    assert load_from(first, second, 0.5) == (EngineLoad("0", 2, 1, 0.25, 100.0, 800.0),
                                             EngineLoad("1", 1, 0, 0.05, 0.0, 200.0))
    assert EngineLoad("0", 2, 1, 0.25, 100.0, 800.0).describe() == (
        "engine 0: 2 running, 1 waiting, KV cache 25.0% used, prompt 100.0 tok/s, generation 800.0 tok/s")


def test_a_counter_that_went_back_is_no_negative_rate():
    first, second = parse(sample(0, 0, 0, 100, 1000)), parse(sample(0, 0, 0, 0, 0))  # the server restarted
    assert load_from(first, second, 1.0)[0].generation_tps == 0.0


def test_a_server_that_does_not_answer_says_so():
    load, problem = live_load("http://127.0.0.1:9", "key", gap_s=0, sleep=lambda _: None)
    assert load == () and problem.startswith("http://127.0.0.1:9/metrics did not answer: "), problem


@pytest.mark.parametrize("text", ["", "# nothing of vLLM's\nprocess_cpu_seconds_total 3.0\n"])
def test_a_page_without_vllms_metrics_gives_nothing(text):
    assert parse(text) == {}


def test_watch_needs_one_deployment(tmp_path):
    from .test_cli import run

    done = run("status", "--watch", env={"HPC_SERVE_HOME": str(tmp_path)})
    assert (done.returncode, done.stderr) == (2, "error: --watch shows one deployment.\n"
                                                 "Give its ID, without --json: hpc-serve status ID --watch.\n")


def test_watch_redraws_until_the_deployment_ends(capsys):
    from hpc_serve.cli import views
    from hpc_serve.client.control import DeploymentStatus

    rows = iter([("READY", (EngineLoad("0", 2, 0, 0.5, 10.0, 300.0),)), ("STOPPED", ())])
    reads = []

    def read():
        phase, load = next(rows)
        reads.append(phase)
        return DeploymentStatus("7", "hpc-serve", "m", "1x1", "RUNNING", phase, "", "-", 1.0, 1, load=load)

    assert views.watch_status(read, every_s=0.01) == 0
    assert reads == ["READY", "STOPPED"]
    assert "STOPPED" in capsys.readouterr().out  # off a terminal, Live leaves the last frame
    views.status_table([DeploymentStatus("7", "hpc-serve", "m", "1x1", "RUNNING", "READY", "", "-", 1.0, 1,
                                         load=(EngineLoad("0", 2, 0, 0.5, 10.0, 300.0),))])
    assert capsys.readouterr().out.endswith(
        "\nnow (vLLM's /metrics):\n  engine 0: 2 running, 0 waiting, KV cache 50.0% used, prompt 10.0 tok/s, "
        "generation 300.0 tok/s\n")
