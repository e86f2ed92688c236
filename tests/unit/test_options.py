"""One options table (planner/options.py): every place that knows an option agrees with it exactly."""

import dataclasses
import inspect

import shutil

import pytest

from hpc_serve import api
from hpc_serve.cli.parser import SPEC_FLAGS, build_parser, spec_options
from hpc_serve.errors import HpcServeError
from hpc_serve.node.args import node_spec, parse_node_args, to_node_args
from hpc_serve.planner.layout import LAUNCHERS, Layout, resolve_layout
from hpc_serve.planner.options import BY_NAME, NODE_OPTIONS, OPTIONS, PASSTHROUGH, SETTING_KINDS
from hpc_serve.planner.settings import DEFAULTS
from hpc_serve.planner.spec import DeploymentSpec, build_spec

#: build_spec's keywords without a default: the settings always give them (gpus_per_node: sinfo, else 8).
REQUIRED = {"model", "gpus_per_node"}
DEFAULT_OF = {option.name: option.default for option in OPTIONS}


def _defaults(params, skip=()) -> dict:
    return {name: p.default for name, p in params.items() if name not in skip}


def test_names_are_unique_and_kinds_known():
    assert len(BY_NAME) == len(OPTIONS)
    assert {option.kind for option in OPTIONS} == {"str", "int", "bool", "list"}
    assert BY_NAME["launcher"].choices == LAUNCHERS


def test_build_spec_takes_exactly_the_options_with_their_defaults():
    params = inspect.signature(build_spec).parameters
    assert all(p.kind is p.KEYWORD_ONLY for p in params.values())
    assert set(params) == set(BY_NAME)
    assert {name for name, p in params.items() if p.default is p.empty} == REQUIRED
    assert _defaults(params, REQUIRED) == {k: v for k, v in DEFAULT_OF.items() if k not in REQUIRED}


def test_the_spec_and_its_layout_hold_exactly_the_spec_options():
    spec_fields = {f.name: f.default for f in dataclasses.fields(DeploymentSpec)}
    layout_fields = {f.name for f in dataclasses.fields(Layout)} - {"notes", "warnings"}
    assert set(spec_fields) - {"layout", "warnings"} == {o.name for o in OPTIONS if o.in_spec and not o.in_layout}
    assert layout_fields == {o.name for o in OPTIONS if o.in_layout}
    assert spec_fields["model"] is dataclasses.MISSING
    assert {k: v for k, v in spec_fields.items() if k not in ("model", "layout", "warnings")} == \
        {o.name: o.default for o in OPTIONS if o.in_spec and not o.in_layout and o.name != "model"}
    layout_params = inspect.signature(resolve_layout).parameters
    assert _defaults(layout_params, {"gpus_per_node"}) == \
        {o.name: o.default for o in OPTIONS if o.in_layout and o.name != "gpus_per_node"}


@pytest.mark.parametrize("function", [api.resolve, api.plan, api.render, api.submit])
def test_the_api_signature_is_the_table(function):
    params = inspect.signature(function).parameters
    assert [(name, p.kind) for name, p in list(params.items())[:2]] == [
        ("model", inspect.Parameter.POSITIONAL_ONLY), ("profile", inspect.Parameter.KEYWORD_ONLY)]
    assert _defaults(params, {"model", "profile"}) == {k: v for k, v in DEFAULT_OF.items() if k != "model"}


def test_the_api_accepts_every_option_and_only_those():
    spec, settings = api.resolve(**{**DEFAULT_OF, "model": "org/m", "gpus_per_node": 8})
    assert spec.model == "org/m" and set(settings.values) == set(BY_NAME)
    with pytest.raises(HpcServeError) as err:
        api.resolve("org/m", gpus_per_node=8, tensor_parallel_size=8)
    assert (err.value.problem, err.value.hint) == (
        "Unknown option 'tensor_parallel_size'.", f"Valid options: {', '.join(sorted(BY_NAME))}.")


def test_the_settings_defaults_and_kinds_are_the_table():
    assert DEFAULTS == {o.name: list(o.default) if o.kind == "list" else o.default for o in OPTIONS}
    assert SETTING_KINDS == {o.name: o.kind for o in OPTIONS}


def _sample(option):
    """(flag words, the value they give) for one option on the command line."""
    if option.kind == "bool":
        return [option.flag], not option.default
    if option.kind == "list":
        return [option.flag, "a=1", option.aliases[0] if option.aliases else option.flag, "b=2"], ["a=1", "b=2"]
    return [option.aliases[0] if option.aliases else option.flag, "7"], 7 if option.kind == "int" else "7"


@pytest.mark.parametrize("command", ["render", "plan", "submit"])
def test_the_cli_flags_are_the_tables(command):
    parser = build_parser()
    assert spec_options(parser.parse_args([command])) == {o.name: None for o in SPEC_FLAGS}  # None: not given
    for option in SPEC_FLAGS:
        words, value = _sample(option)
        assert spec_options(parser.parse_args([command, *words]))[option.name] == value, option.name
    # what has no flag: vLLM's arguments come after --; the rest are config and environment only
    assert {o.name for o in OPTIONS} - {o.name for o in SPEC_FLAGS} == {PASSTHROUGH, "home", "python",
                                                                        "login_host", "ssh_cmd"}


#: Every to_node option away from its default (an MoE hub name is not checked offline).
FULL = dict(model="org/moe", gpus_per_node=4, nodes=4, tp=4, pp=2, dp=2, ep=True, launcher="mp",
            cross_node_tp=True, all2all_backend="deepep_low_latency", partition="gpu", account="proj-1",
            qos="high", time="2:00:00", constraint="a100&ib", exclusive=True, cpus_per_node=64, mem="256G",
            name="my-job", setup=["module load cuda", "-starts-with-a-dash"], env=["A=1", "B=with space"],
            container="docker://vllm/vllm-openai:v0.32.0", engine_cmd="python -m vllm serve",
            ray_cmd="/opt/ray/bin/ray", port=8443, network="10.0.0.0/8", cache_dir="/cache", api_key=False,
            open_metrics=True, max_restarts=2, stall_timeout=0, preflight=False, auto_renew=True, renew_before=10, executor="local",
            vllm_args=["--max-model-len", "512"], home="/shared/registry", python="/opt/py/bin/python3")


def test_every_node_option_is_carried_and_comes_back_equal(tmp_path):
    snapshot = tmp_path / "hf" / "hub" / "models--org--moe" / "snapshots" / "0123abc"  # fetched, as the hub lays it out
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(b"")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0123abc")
    spec = build_spec(**FULL, hf_home=str(tmp_path / "hf"), offline=True)
    shutil.rmtree(tmp_path / "hf")  # the node does not see the login side's cache check again
    argv = to_node_args(spec)
    assert {o.name for o in NODE_OPTIONS} == {o.name for o in OPTIONS if o.in_spec} - {"model"}
    for option in NODE_OPTIONS:
        if option.name != PASSTHROUGH:
            assert option.flag in argv or any(w.startswith(option.flag + "=") for w in argv), option.name
    assert argv[-3:] == ["--", "--max-model-len", "512"]
    again = node_spec(["--model", spec.model, *argv])
    assert again == spec and again.to_dict() == spec.to_dict()


@pytest.mark.parametrize("options", [
    {"gpus_per_node": 1},
    {"gpus_per_node": 8, "tp": 8, "dp": 2},
    {"gpus_per_node": 8, "nodes": 2, "tp": 8, "pp": 2, "time": "04:00:00"},
    {"gpus_per_node": 8, "nodes": 2, "tp": 2, "launcher": "mp", "env": ["X=a b$c"], "api_key": False},
    {"gpus_per_node": 4, "nodes": 2, "tp": 8, "cross_node_tp": True, "vllm_args": ["--seed", "1"]},
    {"gpus_per_node": 8, "tp": 8, "dp": 2, "ep": True, "partition": "gpu", "max_restarts": 1},
])
def test_the_node_rebuilds_the_login_sides_spec_exactly(options):
    spec = build_spec(model="org/m", **options)
    again = node_spec(["--model", "org/m", *to_node_args(spec)])
    assert again.to_dict() == spec.to_dict()  # what spec.json holds, derivation notes and warnings included


def test_the_node_parser_has_no_defaults_of_its_own():
    assert parse_node_args(["--model", "org/m"]) == {"model": "org/m"}
    assert node_spec(["--model", "org/m", "--gpus-per-node", "8"]) == build_spec(model="org/m", gpus_per_node=8)


@pytest.mark.parametrize("argv,expected", [
    # what the scripts and submitit jobs of the version before the options table wrote
    ("--nodes 2 --gpus-per-node 8 --tp 8 --pp 1 --dp 2 --launcher ray --ep --all2all-backend allgather_reducescatter",
     dict(gpus_per_node=8, nodes=2, tp=8, pp=1, dp=2, launcher="ray", ep=True)),
    ("--nodes 1 --gpus-per-node 1 --tp 1 --pp 1 --dp 1 --launcher mp", dict(gpus_per_node=1)),
    ("--nodes 1 --gpus-per-node 1 --tp 1 --pp 1 --dp 1 --launcher mp --engine-cmd vllm --port 8443 --network ib0 "
     "--cache-dir /c --no-api-key --open-metrics --max-restarts 2 --auto-renew --renew-before 3 --time 4 -- --seed 1",
     dict(gpus_per_node=1, engine_cmd="vllm", port=8443, network="ib0", cache_dir="/c", api_key=False,
          open_metrics=True, max_restarts=2, auto_renew=True, renew_before=3, time="4", vllm_args=["--seed", "1"])),
])
def test_older_node_argvs_still_parse(argv, expected):
    assert node_spec(["--model", "org/m", *argv.split()]) == build_spec(model="org/m", **expected)


def test_the_node_does_not_look_for_the_login_sides_container_file(tmp_path):
    image = tmp_path / "vllm.sif"
    image.write_bytes(b"sif")
    spec = build_spec(model="org/m", gpus_per_node=1, container=str(image))
    image.unlink()  # inside the container, or on a node without that folder
    assert node_spec(["--model", "org/m", *to_node_args(spec)]) == spec
    with pytest.raises(HpcServeError, match="does not exist"):
        build_spec(model="org/m", gpus_per_node=1, container=str(image))


_SBATCH = "has spaces, quotes or shell characters, which an #SBATCH line cannot hold."
#: A bad value of every option with a check or choices, and exactly what it is told.
BAD = {
    "launcher": ("slurm", "Unknown launcher 'slurm'.", "Use one of: auto, ray, mp."),
    "all2all_backend": ("pplx", "--all2all-backend pplx was removed from vLLM, which silently runs "
                        "allgather_reducescatter instead.", "Use --all2all-backend allgather_reducescatter "
                        "(the default), or e.g. deepep_high_throughput / deepep_low_latency on GPUs with DeepEP."),
    "partition": ("a b", f"--partition 'a b' {_SBATCH}", "Give a plain Slurm partition name."),
    "account": ("x$", f"--account 'x$' {_SBATCH}", "Give a plain Slurm account name."),
    "qos": ("q;", f"--qos 'q;' {_SBATCH}", "Give a plain Slurm qos name."),
    "time": ("0", "--time '0' is zero.", "Give at least one minute, e.g. --time 30."),
    "constraint": ('a"', f"--constraint 'a\"' {_SBATCH}", "Give a plain Slurm constraint name."),
    "cpus_per_node": (0, "--cpus-per-node must be at least 1 (got 0).",
                      "Give a positive number of CPUs, or leave it out."),
    "mem": ("64 GB", "--mem '64 GB' is not a Slurm memory size.", "Use e.g. --mem 256G, or --mem 0 for all."),
    "name": ("my job", f"--name 'my job' {_SBATCH}", "Give a plain Slurm job name."),
    "setup": (["a\nb"], "A --setup line contains a newline.", "Give one --setup per line."),
    "env": (["=x"], "--env '=x' is not KEY=VALUE.",
            "Write it as --env NAME=value, e.g. --env VLLM_LOGGING_LEVEL=DEBUG."),
    "container": ("/no/such.sif", "Container image '/no/such.sif' does not exist.",
                  "Give the path of an Apptainer .sif or Enroot .sqsh file, or a registry image such as "
                  "docker://vllm/vllm-openai:latest."),
    "engine_cmd": ("", "--engine-cmd is empty.", "Leave it out for 'vllm serve', or name a command."),
    "ray_cmd": (" ", "--ray-cmd is empty.", "Leave it out for 'ray', or name the ray command."),
    "port": (65536, "--port 65536 is outside 1024-65535.",
             "Pick an unprivileged port, or leave --port out to get one derived from the job id."),
    "network": ("eth 0", "--network 'eth 0' is not an interface name.",
                "Give an interface name (--network ib0) or a CIDR (--network 10.1.0.0/16)."),
    "max_restarts": (-1, "--max-restarts must be between 0 and 100 (got -1).",
                     "Give how many times a failed deployment may be requeued, e.g. --max-restarts 2."),
    "executor": ("kubernetes", "Unknown executor 'kubernetes'.", "Use one of: slurm, local."),
    "stall_timeout": (-5, "--stall-timeout must be 0 (never) or a number of seconds (got -5).",
                      "Give how long a start-up may go without new engine output, e.g. --stall-timeout 1800."),
    "gpu_memory": (0, "--gpu-memory must be at least 1 GiB (got 0).",
                   "Give the memory of one GPU in GiB, e.g. --gpu-memory 80."),
    "replicas": (0, "--replicas must be between 1 and 64 (got 0).",
                 "Give how many copies of the deployment serve behind one router, e.g. --replicas 2."),
    "router": ("k8s", "Unknown router 'k8s'.", "Use one of: slurm, local."),
    "router_policy": ("fastest", "Unknown router_policy 'fastest'.",
                      "Use one of: cache_aware, round_robin, random, consistent_hash."),
    "router_partition": ("cpu;x", f"--router-partition 'cpu;x' {_SBATCH}", "Give a plain Slurm partition name."),
    "router_cmd": ("", "--router-cmd is empty.", "Leave it out for 'vllm-router', or name a command."),
}


def test_every_checked_option_has_a_bad_value_here():
    assert set(BAD) == {o.name for o in OPTIONS if o.check or o.choices}


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_value_is_refused_naming_the_fix(name):
    value, problem, hint = BAD[name]
    for refuse in (lambda: BY_NAME[name].validate(value), lambda: build_spec(model="org/m", gpus_per_node=8,
                                                                              **{name: value})):
        with pytest.raises(HpcServeError) as err:
            refuse()
        assert (err.value.problem, err.value.hint) == (problem, hint)
