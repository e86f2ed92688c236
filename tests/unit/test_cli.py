"""The CLI as a user runs it: real processes, exit codes, one- or two-line errors."""

import json
import os
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "hpc_serve"]


def run(*args, env=None, cwd=None):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})})


def test_version():
    done = run("--version")
    assert done.returncode == 0 and done.stdout.startswith("hpc-serve 0.")


def test_help_lists_the_contract():
    done = run("--help")
    assert done.returncode == 0
    for command in ("submit", "render", "plan", "status", "list", "logs", "wait", "cancel",
                    "endpoint", "tunnel", "smoke", "demo", "config"):
        assert command in done.stdout


def test_render_help_shows_option_groups():
    out = run("render", "--help").stdout
    for text in ("layout:", "resources:", "node setup:", "--gpus-per-node", "--launcher", "--setup",
                 "--container", "--engine-cmd", "--output"):
        assert text in out


def test_render_prints_a_script():
    done = run("render", "org/m", "--nodes", "2", "--tp", "8", "--pp", "2", "-p", "gpu", "--", "--max-model-len", "512")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("#!/bin/bash")
    assert "#SBATCH --partition=gpu" in done.stdout and "-- --max-model-len 512" in done.stdout
    assert "hpc-serve render org/m --nodes 2" in done.stdout


def test_render_output_file(tmp_path):
    target = tmp_path / "job.sbatch"
    done = run("render", "org/m", "--gpus-per-node", "1", "-o", str(target))
    assert done.returncode == 0 and target.read_text().startswith("#!/bin/bash")
    assert "sbatch" in done.stderr


def test_plan_json():
    done = run("plan", "--model", "org/m", "--tp", "8", "--dp", "2", "--json")
    data = json.loads(done.stdout)
    assert data["spec"]["layout"]["nodes"] == 2 and len(data["nodes"]) == 2
    assert data["sources"]["gpus_per_node"].startswith(("fallback", "sinfo"))


def test_plan_table_names_roles_and_sources():
    done = run("plan", "org/m", "--nodes", "2", "--tp", "8", "--pp", "2", "--gpus-per-node", "8")
    assert done.returncode == 0, done.stderr
    assert "ray head + vllm api" in done.stdout and "ray worker" in done.stdout
    assert "gpus_per_node=8 from command line" in done.stdout


def test_model_from_the_profile(isolated_config):
    config = isolated_config / ".config" / "hpc-serve" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text('[profiles.lab]\nmodel = "org/from-profile"\ngpus_per_node = 8\n')
    done = run("plan", "--nodes", "2", "--tp", "8", "--pp", "2", "--profile", "lab", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["spec"]["model"] == "org/from-profile"


@pytest.mark.parametrize("args,message", [
    (["--nodes", "2", "--tp", "8", "--pp", "2"], "No model given"),
    (["m", "--nodes", "2", "--tp", "8", "--dp", "1"], "paid GPUs would idle"),
    (["m", "--tp", "16"], "larger than the 8 GPUs"),
    (["m", "--tp", "3"], "not divisible by --tp 3"),
    (["m", "--tp", "0"], "at least 1"),
    (["m", "--time", "4h"], "not a Slurm time limit"),
    (["m", "--port", "80"], "outside 1024-65535"),
    (["m", "--launcher", "slurm"], "Unknown launcher"),
    (["m", "--profile", "nope"], "Unknown profile 'nope'"),
    (["m", "--env", "NOVALUE"], "is not KEY=VALUE"),
    (["m", "--container", "/nonexistent/vllm.sif"], "does not exist"),
    (["m", "--tp", "8", "--", "--tensor-parallel-size", "4"], "contradicts the layout"),
    (["", "--tp", "8"], "No model given"),
    (["a", "--model", "b"], "Two models given"),
])
def test_bad_input_is_a_short_error_with_exit_code_2(args, message, tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    for command in ("render", "plan"):
        done = run(command, *args, "--gpus-per-node", "8", cwd=workdir)
        assert done.returncode == 2, (command, done.stdout, done.stderr)
        assert message in done.stderr
        lines = done.stderr.strip().splitlines()
        assert 1 <= len(lines) <= 2 and lines[0].startswith("error: "), done.stderr
        assert "Traceback" not in done.stderr and done.stdout == ""
        assert list(workdir.iterdir()) == []  # nothing written


def test_bad_config_file_errors(isolated_config):
    config = isolated_config / ".config" / "hpc-serve" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text("partition = gpu\n")
    done = run("render", "m")
    assert done.returncode == 2 and "line 1" in done.stderr
    config.write_text('partiton = "gpu"\n')
    done = run("config", "show")
    assert done.returncode == 2 and "Unknown config key 'partiton'" in done.stderr


def test_debug_shows_the_traceback():
    done = run("--debug", "render", "m", "--tp", "3")
    assert done.returncode != 0 and "Traceback" in done.stderr


def test_render_to_unwritable_path():
    done = run("render", "m", "--gpus-per-node", "1", "-o", "/nonexistent-dir/job.sbatch")
    assert done.returncode == 2 and "Cannot write" in done.stderr


def test_usage_error_exits_2():
    done = run("render", "m", "--tp", "eight")
    assert done.returncode == 2 and "invalid int value" in done.stderr


def test_config_show_sources(isolated_config):
    config = isolated_config / ".config" / "hpc-serve" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text('partition = "gpu"\n')
    done = run("config", "show", "--sources", env={"HPC_SERVE_QOS": "high", "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    assert "user file" in done.stdout and "environment (HPC_SERVE_*)" in done.stdout


def test_cli_does_not_import_heavy_modules():
    code = ("import sys; from hpc_serve.cli.app import main; main(['render','m','--gpus-per-node','1']); "
            "bad = [m for m in ('ray','vllm','submitit','rich','torch') if m in sys.modules]; "
            "sys.stderr.write(repr(bad))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stderr.strip().endswith("[]"), done.stderr


def test_node_agent_imports_without_cli_dependencies():
    code = ("import sys; sys.modules['jinja2'] = None; sys.modules['rich'] = None; "
            "import hpc_serve.node.agent, hpc_serve.planner.launch; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr
