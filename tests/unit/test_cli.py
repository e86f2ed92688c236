"""The CLI as a user runs it: real processes, exact exit codes, the exact error lines (problem, hint)."""

import json
import os
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "hpc_serve"]


def run(*args, env=None, cwd=None):
    """The CLI as a process, on a PATH without Slurm's tools: no sinfo answers for the GPUs per node."""
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PATH": os.path.dirname(sys.executable), **(env or {})})


def error_lines(problem: str, hint: str) -> str:
    """What stderr holds for an HpcServeError: the problem after ``error: ``, then the hint."""
    return f"error: {problem}\n{hint}\n"


def test_version():
    from hpc_serve.version import __version__

    done = run("--version")
    assert (done.returncode, done.stdout, done.stderr) == (0, f"hpc-serve {__version__}\n", "")


def test_no_command_prints_the_help_and_exits_2():
    done = run()
    assert done.returncode == 2 and done.stdout.startswith("usage: hpc-serve [-h] [--version] [--debug] COMMAND")


def test_help_lists_the_contract():
    done = run("--help")
    assert done.returncode == 0
    listed = [line.split()[0] for line in done.stdout.split("positional arguments:")[1].split("options:")[0]
              .splitlines()[2:] if line.startswith("    ") and not line.startswith("     ")]
    assert listed == ["render", "plan", "submit", "wait", "status", "list", "endpoint", "tunnel", "smoke",
                      "fetch", "bench", "scale", "logs", "cancel", "demo", "config"]


def test_render_help_shows_option_groups_from_the_options_table():
    from hpc_serve.cli.parser import SPEC_GROUPS
    from hpc_serve.planner.options import OPTIONS

    out = run("render", "--help", env={"COLUMNS": "200"}).stdout
    sections = {title: " ".join(out.split(f"\n{title}:\n")[1].split("\n\n")[0].split())
                for title in SPEC_GROUPS}
    for option in (option for option in OPTIONS if option.group is not None):
        metavar = {"bool": "", "list": " VALUE"}.get(option.kind, " " + option.name.split("_")[0].upper())
        flags = ", ".join(flag + metavar for flag in (option.flag, *option.aliases))
        assert f" {flags} {option.help}" in f" {sections[option.group]}", option.name
    assert "--output FILE, -o FILE" in out
    assert sections["node setup"].endswith("--profile PROFILE named profile from your config")


def test_render_prints_a_script():
    done = run("render", "org/m", "--nodes", "2", "--tp", "8", "--pp", "2", "-p", "gpu", "--", "--max-model-len", "512")
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.startswith("#!/bin/bash\n")
    assert "\n#SBATCH --partition=gpu\n" in done.stdout
    assert done.stdout.rstrip().endswith(
        'python3 -m hpc_serve.node --model "$MODEL" --nodes 2 --gpus-per-node 8 --tp 8 --pp 2 --partition gpu '
        "-- --max-model-len 512")
    assert "\n#   hpc-serve render org/m --nodes 2 --tp 8 --pp 2 -p gpu -- --max-model-len 512\n" in done.stdout


def test_render_output_file(tmp_path):
    target = tmp_path / "job.sbatch"
    done = run("render", "org/m", "--gpus-per-node", "1", "-o", str(target))
    assert (done.returncode, done.stdout) == (0, "") and target.read_text().startswith("#!/bin/bash\n")
    assert done.stderr == f"wrote {target}  (submit it with: sbatch {target})\n"


def test_plan_json():
    done = run("plan", "--model", "org/m", "--tp", "8", "--dp", "2", "--json")
    assert (done.returncode, done.stderr) == (0, "")
    data = json.loads(done.stdout)
    assert data["spec"]["layout"]["nodes"] == 2 and len(data["nodes"]) == 2
    assert data["sources"]["gpus_per_node"] == "fallback (no flag, profile or sinfo answer)"
    assert data["sources"]["tp"] == "command line" and data["sources"]["launcher"] == "default"


def test_plan_table_names_roles_and_sources():
    done = run("plan", "org/m", "--nodes", "2", "--tp", "8", "--pp", "2", "--gpus-per-node", "8")
    assert (done.returncode, done.stderr) == (0, "")
    assert "ray head + vllm api" in done.stdout and "ray worker" in done.stdout
    assert "\ngpus_per_node=8 from command line\n" in done.stdout


def test_model_from_the_profile(isolated_config):
    config = isolated_config / ".config" / "hpc-serve" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text('[profiles.lab]\nmodel = "org/from-profile"\ngpus_per_node = 8\n')
    done = run("plan", "--nodes", "2", "--tp", "8", "--pp", "2", "--profile", "lab", "--json")
    assert (done.returncode, done.stderr) == (0, "")
    assert json.loads(done.stdout)["spec"]["model"] == "org/from-profile"


BAD_INPUT = [
    (["--nodes", "2", "--tp", "8", "--pp", "2"], "No model given.",
     "Name one: hpc-serve submit MODEL, --model MODEL, or 'model = ...' in your config profile."),
    (["", "--tp", "8"], "No model given.",
     "Name one: hpc-serve submit MODEL, --model MODEL, or 'model = ...' in your config profile."),
    (["a", "--model", "b"], "Two models given: 'a' and --model 'b'.", "Give the model once."),
    (["m", "--nodes", "2", "--tp", "8", "--dp", "1"],
     "tp*pp*dp = 8*1*1 = 8 GPUs, but 2 nodes x 8 GPUs = 16: 8 paid GPUs would idle.",
     "To use them all, use --dp 2; or ask for fewer nodes or --gpus-per-node."),
    (["m", "--tp", "16"], "--tp 16 is larger than the 8 GPUs of a node: TP belongs inside a node.",
     "Use --tp 8 with --pp 2 across nodes, or --cross-node-tp if you really want TP over the network."),
    (["m", "--tp", "3"], "--gpus-per-node 8 is not divisible by --tp 3: some GPUs of each node would idle.",
     "Use a --tp that divides 8 (e.g. 2)."),
    (["m", "--tp", "0"], "--tp must be a whole number of at least 1 (got 0).", "Give a positive size, e.g. --tp 1."),
    (["m", "--launcher", "slurm"], "Unknown launcher 'slurm'.", "Use one of: auto, ray, mp."),
    (["m", "--executor", "k8s"], "Unknown executor 'k8s'.", "Use one of: slurm, local."),
    (["m", "--time", "4h"], "--time '4h' is not a Slurm time limit.",
     "Use minutes, HH:MM:SS or D-HH:MM:SS, e.g. --time 04:00:00 or --time 1-00:00:00."),
    (["m", "--port", "80"], "--port 80 is outside 1024-65535.",
     "Pick an unprivileged port, or leave --port out to get one derived from the job id."),
    (["m", "--mem", "1X"], "--mem '1X' is not a Slurm memory size.", "Use e.g. --mem 256G, or --mem 0 for all."),
    (["m", "--cpus-per-node", "0"], "--cpus-per-node must be at least 1 (got 0).",
     "Give a positive number of CPUs, or leave it out."),
    (["m", "--max-restarts", "101"], "--max-restarts must be between 0 and 100 (got 101).",
     "Give how many times a failed deployment may be requeued, e.g. --max-restarts 2."),
    (["m", "--auto-renew"], "--auto-renew needs a time limit to renew before.",
     "Give --time, e.g. --time 24:00:00 --auto-renew."),
    (["m", "--partition", "a;b"],
     "--partition 'a;b' has spaces, quotes or shell characters, which an #SBATCH line cannot hold.",
     "Give a plain Slurm partition name."),
    (["m", "--env", "NOVALUE"], "--env 'NOVALUE' is not KEY=VALUE.",
     "Write it as --env NAME=value, e.g. --env VLLM_LOGGING_LEVEL=DEBUG."),
    (["m", "--env", "HF_TOKEN=x"],
     "--env HF_TOKEN=... looks like a secret, and --env values are written into the job script.",
     "Export HF_TOKEN in your shell before submitting instead: the job inherits it at run time."),
    (["m", "--network", "a/b"], "--network 'a/b' is not a CIDR.",
     "Give an interface name (--network ib0) or a CIDR (--network 10.1.0.0/16)."),
    (["m", "--engine-cmd", " "], "--engine-cmd is empty.", "Leave it out for 'vllm serve', or name a command."),
    (["m", "--container", "/nonexistent/vllm.sif"], "Container image '/nonexistent/vllm.sif' does not exist.",
     "Give the path of an Apptainer .sif or Enroot .sqsh file, or a registry image such as "
     "docker://vllm/vllm-openai:latest."),
    (["m", "--tp", "8", "--", "--tensor-parallel-size", "4"],
     "--tensor-parallel-size 4 in the vLLM arguments contradicts the layout hpc-serve manages.",
     "Set it with --tp instead (now tp=8, pp=1, dp=1)."),
]


@pytest.mark.parametrize("args,problem,hint", BAD_INPUT, ids=[" ".join(a) or "empty" for a, _, _ in BAD_INPUT])
def test_bad_input_is_its_two_error_lines_and_exit_code_2(args, problem, hint, tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    cut = args.index("--") if "--" in args else len(args)
    for command in ("render", "plan", "submit"):
        done = run(command, *args[:cut], "--gpus-per-node", "8", *args[cut:], cwd=workdir)
        assert (done.returncode, done.stderr, done.stdout) == (2, error_lines(problem, hint), ""), command
        assert list(workdir.iterdir()) == []  # nothing written


def test_unknown_profile_names_the_known_ones_and_where_to_define_it(isolated_config):
    done = run("render", "m", "--profile", "nope")
    config = isolated_config / ".config" / "hpc-serve" / "config.toml"
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == error_lines("Unknown profile 'nope'.",
                                      f"Known profiles: none defined. Define it as [profiles.nope] in {config}.")


def test_bad_config_file_errors(isolated_config):
    from hpc_serve.planner.options import OPTIONS

    config = isolated_config / ".config" / "hpc-serve" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text("partition = gpu\n")
    done = run("render", "m")
    problem, hint = done.stderr.splitlines()
    assert done.returncode == 2 and problem.startswith(f"error: Config file {config} is not valid TOML: ")
    assert "line 1" in problem and hint == 'Fix that line (TOML strings need quotes: partition = "gpu").'
    config.write_text('partiton = "gpu"\n')
    done = run("config", "show")
    keys = ", ".join(sorted(option.name for option in OPTIONS))
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == error_lines(f"Unknown config key 'partiton' in {config}.", f"Valid keys: {keys}.")


def test_debug_shows_the_traceback():
    done = run("--debug", "render", "m", "--tp", "3")
    assert done.returncode == 1 and done.stderr.startswith("Traceback (most recent call last):\n")
    assert done.stderr.endswith("hpc_serve.errors.HpcServeError: --gpus-per-node 8 is not divisible by --tp 3: "
                                "some GPUs of each node would idle.\nUse a --tp that divides 8 (e.g. 2).\n")


def test_render_to_unwritable_path():
    done = run("render", "m", "--gpus-per-node", "1", "-o", "/nonexistent-dir/job.sbatch")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == error_lines("Cannot write /nonexistent-dir/job.sbatch: No such file or directory.",
                                      "Choose a writable path.")


def test_usage_error_exits_2():
    done = run("render", "m", "--tp", "eight")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.splitlines()[-1] == "hpc-serve render: error: argument --tp: invalid value: 'eight' (a whole number, or auto)"


def test_cancel_without_an_id():
    done = run("cancel")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == error_lines("Say which deployment to cancel.", "hpc-serve cancel ID, or --all.")


def test_config_show_sources(isolated_config):
    config = isolated_config / ".config" / "hpc-serve" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text('partition = "gpu"\n')
    done = run("config", "show", "--sources", env={"HPC_SERVE_QOS": "high", "COLUMNS": "300"})
    assert (done.returncode, done.stderr) == (0, "")
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:4]]
            for line in done.stdout.splitlines() if line.count("│") == 4}
    assert rows["partition"] == ["'gpu'", f"user file {config}"]
    assert rows["qos"] == ["'high'", "environment (HPC_SERVE_*)"] and rows["launcher"] == ["'auto'", "default"]


def test_the_connect_lines_are_written_by_one_function():
    from hpc_serve.cli.views import export_lines, ready_lines

    assert export_lines("http://10.0.0.1:20000/v1", "/home/me/key file") == [
        "export OPENAI_BASE_URL=http://10.0.0.1:20000/v1", "export OPENAI_API_KEY=\"$(cat '/home/me/key file')\""]
    endpoint = {"url": "http://10.0.0.1:20000/v1", "served_model": "org/m", "hostname": "node1",
                "host": "10.0.0.1", "port": 20000, "api_key_file": "/k"}
    assert ready_lines("42", endpoint, "login") == [
        "READY: http://10.0.0.1:20000/v1  (model org/m, on node1)",
        "from your laptop: ssh -N -L 127.0.0.1:8000:10.0.0.1:20000 login",
        "then:             export OPENAI_BASE_URL=http://127.0.0.1:8000/v1",
        '                  export OPENAI_API_KEY="$(cat /k)"',
        "or, with hpc-serve on your laptop (a free port, reconnects, follows restarts): "
        "hpc-serve tunnel 42 --via login"]
    assert ready_lines("42", {**endpoint, "api_key_file": None}, "login")[3] == \
        "                  (no API key: started with --no-api-key)"


@pytest.mark.parametrize("argv", [["--help"], ["status"], ["render", "m", "--gpus-per-node", "1"]])
def test_cli_does_not_import_heavy_modules(argv, tmp_path):
    code = (f"import sys; from hpc_serve.cli.app import main; code = main({argv!r}); "
            "bad = [m for m in ('ray', 'vllm', 'submitit', 'rich', 'torch', 'jinja2') if m in sys.modules]; "
            "sys.stderr.write(repr(bad))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "HPC_SERVE_HOME": str(tmp_path)})
    expected = ["jinja2"] if argv[0] == "render" else []  # render fills the templates
    assert done.stderr.strip().endswith(repr(expected)), done.stderr


def test_node_agent_imports_without_cli_dependencies():
    code = ("import sys; sys.modules['jinja2'] = None; sys.modules['rich'] = None; "
            "import hpc_serve.node.agent, hpc_serve.planner.launch; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr
