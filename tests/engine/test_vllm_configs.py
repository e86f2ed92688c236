"""vLLM's own code on every layout hpc-serve plans (issue 12), run with the vLLM venv's Python.

- The option table of hpc_serve/vllm_parser.py is what vLLM's parser derives, and every spelling
  of a listed option (each prefix, ``_`` for ``-``) resolves as vLLM's parser resolves it.
- The argv of every node of every sbatch/ scenario, and of the mp layouts (DP whose replicas span
  nodes among them): parsed by vLLM's parser, dispatched by `vllm serve` (API server or headless,
  without vLLM's refusals), and turned into vLLM's VllmConfig by EngineArgs.create_engine_config on
  the CPU platform, whose ParallelConfig is the layout.
- Ray DP's placement groups (vLLM's create_dp_placement_groups) against a real two-node Ray started
  with hpc-serve's own `ray start` lines, and the ports those Ray nodes listen on.

This file is also the driver: ``python test_vllm_configs.py MODE`` with vLLM's Python reads JSON
on stdin and prints one ``RESULT {json}`` line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    import pytest
except ModuleNotFoundError:  # run as the driver by vLLM's Python, which has no pytest
    from types import SimpleNamespace

    pytest = SimpleNamespace(mark=SimpleNamespace(engine=None), fixture=lambda **_: lambda f: f)

pytestmark = pytest.mark.engine
ROOT = Path(__file__).resolve().parents[2]


def run_driver(vllm_env, mode: str, payload, timeout: int = 600, env: dict | None = None):
    done = subprocess.run([vllm_env.python, __file__, mode], input=json.dumps(payload),
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                               "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, (done.stdout[-3000:], done.stderr[-3000:])
    return json.loads(lines[-1].removeprefix("RESULT "))


# --- the option table -----------------------------------------------------------------------

def test_the_option_table_is_what_vllms_parser_derives(vllm_env):
    from hpc_serve.planner import vllm_parser

    derived = run_driver(vllm_env, "table", None)
    table = {dest: [kind, nargs, list(flags), list(negatives)]
             for dest, (kind, nargs, flags, negatives) in vllm_parser._TABLE.items()}
    assert derived["table"] == table, "vLLM's parser changed: regenerate with python -m hpc_serve.planner.vllm_parser"
    assert derived["all2all_choices"] == sorted(vllm_parser.ALL2ALL_CHOICES)
    assert derived["version"].startswith("0.32")


def _spellings() -> list[str]:
    from hpc_serve.planner.vllm_parser import OPTIONS

    words = set()
    for flag in OPTIONS:
        if flag.startswith("--"):
            words |= {flag[:n] for n in range(3, len(flag) + 1)}
            words.add("--" + flag[2:].replace("-", "_"))
        else:
            words |= {flag[:n] for n in range(2, len(flag) + 1)}
    return sorted(words | {"-n2", "-r=1", "-tp=4", "-tp4", "-dp2", "--tensor_par=4", "--max-model-len"})


def test_every_spelling_resolves_as_vllms_parser_resolves_it(vllm_env):
    from hpc_serve.planner.vllm_parser import LATER_NEGATIONS, OPTIONS, resolve

    words = _spellings()
    vllm = run_driver(vllm_env, "resolve", words)
    later = {flag for flags in LATER_NEGATIONS.values() for flag in flags}
    checked = 0
    for word in words:
        ours, _ = resolve(word)
        theirs = vllm[word]  # a dest, "ambiguous", or None (no option)
        if set(ours) & later or any(later_flag.startswith(word) for later_flag in later):
            continue  # options of later vLLM releases: this vLLM does not know them
        if len(ours) > 1:
            assert theirs == "ambiguous", word
        elif len(ours) == 1:  # vLLM reads the same option, or refuses the word as ambiguous
            assert theirs in (OPTIONS[ours[0]].dest, "ambiguous"), (word, theirs)
        else:  # not a listed destination: vLLM reads it as something hpc-serve does not care about
            assert theirs not in {o.dest for o in OPTIONS.values()} or theirs == "ambiguous", (word, theirs)
        checked += 1
    assert checked > 1500


FULL = [["--tensor_parallel_size=4"], ["--tensor-par", "4"], ["-n2"], ["-r=1"], ["-t", "2"],
        ["--data_parallel_hybrid_lb"], ["-asc", "0"], ["--api_server_c", "2"],
        ["--data-parallel-size", "2"], ["-dpl", "2"], ["--pipeline_parallel_size", "2"],
        ["--lora-modules", "a=/a", "b=/b", "--seed", "3"], ["--chat_template=x"], ["-ep"]]


def test_whole_pass_through_lines_set_what_hpc_serve_reads_them_as(vllm_env):
    from hpc_serve.planner.vllm_parser import read_args

    changed = run_driver(vllm_env, "full", FULL)
    for argv, dests in zip(FULL, changed):
        ours = {arg.dest for arg in read_args(argv) if arg.dest}
        assert ours <= set(dests) and set(dests) - ours <= {"seed"}, (argv, dests)


# --- every layout through vLLM's parser, dispatch and config ---------------------------------

def _sbatch_layouts() -> list[tuple[str, dict]]:
    from hpc_serve.node.args import parse_node_args

    out = []
    for path in sorted((ROOT / "sbatch").glob("*.sbatch")):
        line = path.read_text().split("-m hpc_serve.node", 1)[1].split("\n")[0]
        values = parse_node_args(line.replace('"$MODEL"', "org/model").split())
        out.append((path.name, values))
    return out


#: Layouts beyond sbatch/: mp's three multi-node forms, and pass-through API-server options.
EXTRA_LAYOUTS: list[tuple[str, dict]] = [
    ("mp-dp-spanning", {"gpus_per_node": 8, "nodes": 4, "tp": 8, "pp": 2, "dp": 2, "launcher": "mp"}),
    ("mp-dp-across-nodes", {"gpus_per_node": 8, "nodes": 2, "tp": 2, "launcher": "mp",
                            "vllm_args": ["--api-server-count", "2", "--chat-template", "{{ x }}"]}),
    ("mp-tp-pp", {"gpus_per_node": 8, "nodes": 2, "tp": 8, "pp": 2, "launcher": "mp"}),
    ("mp-ep-spanning", {"gpus_per_node": 4, "nodes": 4, "tp": 8, "dp": 2, "ep": True, "launcher": "mp",
                        "cross_node_tp": True}),
    ("ray-dp-span", {"gpus_per_node": 8, "nodes": 4, "tp": 8, "pp": 2, "dp": 2, "launcher": "ray"}),
    ("ray-dp-packed", {"gpus_per_node": 8, "nodes": 2, "tp": 2, "launcher": "ray"}),
]


def _model_dirs(base: Path, tiny: str) -> dict[str, str]:
    """Config-only models (vLLM's config code reads config.json and the tokenizer, not weights):
    a dense one whose heads split over TP 8, and an MoE one for --ep."""
    dense, moe = base / "dense", base / "moe"
    for folder in (dense, moe):
        folder.mkdir(parents=True, exist_ok=True)
        for name in os.listdir(tiny):
            if not name.endswith(".safetensors") and name != "config.json":
                shutil.copy(Path(tiny) / name, folder / name)
    config = json.loads((Path(tiny) / "config.json").read_text())
    config.update(num_attention_heads=16, num_key_value_heads=16, head_dim=32, hidden_size=512,
                  num_hidden_layers=4, layer_types=["full_attention"] * 4)
    (dense / "config.json").write_text(json.dumps(config))
    moe_config = {**config, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
                  "num_experts": 32, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                  "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True}
    (moe / "config.json").write_text(json.dumps(moe_config))
    return {"dense": str(dense), "moe": str(moe)}


def _node_argvs(name: str, values: dict, models: dict[str, str]) -> list[dict]:
    from hpc_serve.planner.launch import make_plan
    from hpc_serve.planner.ports import job_ports
    from hpc_serve.planner.spec import build_spec
    from hpc_serve.planner.vllm_args import Runtime

    model = models["moe" if values.get("ep") else "dense"]
    spec = build_spec(**{**values, "model": model, "executor": "local"})
    lay, out = spec.layout, []
    for rank in range(lay.nodes):
        rt = Runtime.for_job(job_ports(1), f"10.0.0.{rank + 1}", "10.0.0.1", "/tmp/hs-1")
        for process in make_plan(spec, rt).nodes[rank].processes:
            if process.name == "vllm":
                slots = lay.node_slots(rank)
                out.append({"name": name, "rank": rank, "argv": list(process.argv[2:]),
                            "env": dict(process.env), "tp": lay.tp, "pp": lay.pp, "dp": lay.dp,
                            "dp_local": lay.dp_local, "dp_rank": slots.dp_ranks[0], "ep": lay.ep,
                            "launcher": lay.launcher, "nodes": lay.nodes,
                            "per_replica": max(1, lay.replica_gpus // lay.gpus_per_node),
                            "spans": lay.spans_nodes})
    return out


@pytest.fixture(scope="module")
def configs(vllm_env, tmp_path_factory):
    models = _model_dirs(tmp_path_factory.mktemp("models"), vllm_env.model)
    runs = [run for name, values in _sbatch_layouts() + EXTRA_LAYOUTS
            for run in _node_argvs(name, values, models)]
    assert {run["name"] for run in runs} >= {p.name for p in (ROOT / "sbatch").glob("*.sbatch")}
    return runs, run_driver(vllm_env, "configs", runs)


def test_every_node_of_every_layout_parses_and_dispatches_as_planned(configs):
    runs, results = configs
    assert len(results) == len(runs) > 6
    for run, result in zip(runs, results):
        where = f"{run['name']} node {run['rank']}"
        assert "parse_error" not in result, (where, result)
        assert "dispatch_error" not in result, (where, result)
        assert result["path"] == ("headless" if run["rank"] > 0 else "api"), (where, result)


def test_every_node_of_every_layout_builds_vllms_parallel_config(configs):
    runs, results = configs
    for run, result in zip(runs, results):
        where = f"{run['name']} node {run['rank']}"
        assert "config_error" not in result, (where, result.get("config_error"))
        p = result["parallel"]
        assert (p["tensor_parallel_size"], p["pipeline_parallel_size"], p["data_parallel_size"]) == \
            (run["tp"], run["pp"], run["dp"]), where
        assert p["world_size"] == run["tp"] * run["pp"], where
        assert p["enable_expert_parallel"] == run["ep"], where
        if run["dp"] > 1:
            assert p["data_parallel_size_local"] == run["dp_local"], where  # defect 1
        if run["launcher"] == "mp":
            assert p["data_parallel_rank"] == run["dp_rank"], where
            assert p["nnodes_within_dp"] == (run["per_replica"] if run["spans"] or run["dp"] == 1 else 1), where
            assert p["data_parallel_hybrid_lb"] is False and p["data_parallel_external_lb"] is False, where
        else:
            assert p["distributed_executor_backend"] == "ray", where
            if run["dp"] > 1:
                assert p["data_parallel_backend"] == "ray" and p["data_parallel_master_ip"] == "10.0.0.1"


def test_ray_dp_without_the_local_size_is_what_vllm_refuses(vllm_env, tmp_path):
    """Today's argv of sbatch/tp8-dp2-ray.sbatch, less --data-parallel-size-local: vLLM takes the
    local size to be 2, which its strict packing cannot place on node 0 (defect 1)."""
    models = _model_dirs(tmp_path, vllm_env.model)
    (run,) = [r for r in _node_argvs("tp8-dp2-ray", dict(_sbatch_layouts())["tp8-dp2-ray.sbatch"], models)]
    index = run["argv"].index("--data-parallel-size-local")
    run["argv"][index:index + 2] = []
    (result,) = run_driver(vllm_env, "configs", [run])
    assert result["parallel"]["data_parallel_size_local"] == 2


# --- Ray: hpc-serve's ray start lines, and vLLM's DP placement groups on them -------------------

def _listening_ports(pids: set[int]) -> set[int]:
    inodes = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:
            continue
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as handle:
            for line in list(handle)[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _tree(pids: set[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                parent = int(Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(name))
    found, todo = set(), list(pids)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children.get(pid, [])
    return found


@pytest.fixture(scope="module")
def ray_two_nodes(vllm_env, tmp_path_factory):
    """A head on 127.0.0.2 and a worker on 127.0.0.3, 8 fake GPUs each, started with ray_argv.

    Both nodes share this machine, so the worker's per-node ports come from another job id (on a
    cluster both nodes use the same job's); the GCS is the head's."""
    from dataclasses import replace

    from hpc_serve.planner.launch import node_plan
    from hpc_serve.planner.ports import job_ports
    from hpc_serve.node.ray_cluster import ray_env
    from hpc_serve.planner.spec import build_spec
    from hpc_serve.planner.vllm_args import Runtime

    # short: Ray's Unix socket paths under it must stay within 107 bytes, which pytest's own
    # temp folders (/tmp/pytest-of-root/pytest-108/...) can exceed
    tmp_path = Path(tempfile.mkdtemp(prefix="hs-ray-", dir="/tmp"))
    job = 4000 + os.getpid() % 500
    head_rt = Runtime.for_job(job_ports(job), "127.0.0.2", "127.0.0.2", str(tmp_path / "head"))
    worker_ports = job_ports(job + 1)
    worker_rt = Runtime.for_job(worker_ports, "127.0.0.3", "127.0.0.2", str(tmp_path / "worker"))
    worker_rt = replace(worker_rt, ray_port=head_rt.ray_port)
    spec = build_spec(model="org/m", gpus_per_node=8, tp=8, dp=2, launcher="ray",
                      ray_cmd=vllm_env.ray_cmd, executor="local")
    token = tmp_path / "ray_token"
    token.write_text(os.urandom(32).hex())
    token.chmod(0o600)
    auth = dict(ray_env(str(token), 60))
    started = []
    try:
        for rank, rt in ((0, head_rt), (1, worker_rt)):
            plan = node_plan(spec, rank, rt)
            (ray,) = [p for p in plan.processes if p.name == "ray"]
            with open(tmp_path / f"ray-{rank}.log", "w") as log:  # exactly the plan's ray start
                started.append((subprocess.Popen(list(ray.argv), env={**os.environ, **dict(ray.env), **auth},
                                                 stdout=log, stderr=subprocess.STDOUT,
                                                 start_new_session=True), plan, rt))
        yield {"address": f"127.0.0.2:{head_rt.ray_port}", "auth": auth, "started": started,
               "tmp": tmp_path}
    finally:  # each `ray start` leads its own process group: end the groups we started
        for signum, wait in ((15, 45), (9, 5)):
            for popen, _, _ in reversed(started):
                if popen.poll() is None:  # only while the leader lives: a dead leader's pid may be reused
                    try:
                        os.killpg(popen.pid, signum)
                    except ProcessLookupError:
                        continue
            for popen, _, _ in started:
                try:
                    popen.wait(wait)
                except subprocess.TimeoutExpired:
                    pass
        shutil.rmtree(tmp_path, ignore_errors=True)


def test_ray_dp_placement_groups_on_a_real_two_node_ray(vllm_env, ray_two_nodes, tmp_path):
    """vLLM's create_dp_placement_groups places one DP rank per node with hpc-serve's argv, and
    refuses the argv without --data-parallel-size-local as issue 12 says (defect 1). The CPU
    platform has no Ray device key (it stops vLLM's Ray executor there); the driver sets "GPU", the
    key of the CUDA platform, for this check only."""
    models = _model_dirs(tmp_path / "models", vllm_env.model)
    layout = dict(_sbatch_layouts())["tp8-dp2-ray.sbatch"]
    (run,) = _node_argvs("tp8-dp2-ray", layout, models)
    swap = {"10.0.0.1": "127.0.0.2"}
    run["argv"] = [swap.get(word, word) for word in run["argv"]]
    old = list(run["argv"])
    index = old.index("--data-parallel-size-local")
    old[index:index + 2] = []
    result = run_driver(vllm_env, "placement", {"address": ray_two_nodes["address"],
                                                 "runs": [old, run["argv"]]},
                        env=ray_two_nodes["auth"], timeout=300)
    today, planned = result
    assert planned["nodes"] == ["127.0.0.2", "127.0.0.3"], planned  # DP rank 0 on the head
    assert "Not enough resources to allocate 2 DP ranks on DP master node 127.0.0.2" in today["error"]


def test_ray_nodes_listen_only_on_the_jobs_ports(vllm_env, ray_two_nodes):
    """Every port hpc-serve's two Ray nodes listen on is one the job derived (defect 4), and each
    node listens on every port the plan says it binds (defect 6); the rest lie in the ephemeral
    range (Ray's and vLLM's own picks)."""
    for popen, plan, rt in ray_two_nodes["started"]:
        workers = set(range(int(rt.ray_min_worker_port), int(rt.ray_max_worker_port) + 1))
        planned = {int(p) for p in plan.ports} - {int(rt.api_port)}  # vLLM is not started here
        # the dashboard agent and its metrics need ray[default]; this venv has plain ray, whose
        # agent loads no module and binds nothing; the dashboard's own metrics need the dashboard
        optional = {int(rt.ray_dashboard_agent_grpc_port), int(rt.ray_dashboard_agent_http_port),
                    int(rt.ray_metrics_export_port), int(rt.ray_dashboard_metrics_port)}
        deadline = time.monotonic() + 90  # the agents start after the raylet
        while not planned - optional <= (listening := _listening_ports(_tree({popen.pid}))):
            assert popen.poll() is None and time.monotonic() < deadline, (
                plan.rank, sorted(planned - optional - listening),
                (ray_two_nodes["tmp"] / f"ray-{plan.rank}.log").read_text()[-2000:])
            time.sleep(0.5)
        not_ours = {p for p in listening - planned - workers if p < 32768}
        assert not not_ours, (plan.rank, sorted(not_ours))


def test_ray_start_knows_every_flag_hpc_serve_passes(vllm_env):
    from hpc_serve.planner.ray_args import ray_argv
    from hpc_serve.planner.vllm_args import Runtime

    shown = subprocess.run([vllm_env.ray_cmd, "start", "--help"], capture_output=True, text=True,
                           timeout=120).stdout
    for rank in (0, 1):
        for word in ray_argv(rank, 8, Runtime()):
            if word.startswith("--"):
                assert word.split("=")[0] in shown, word


# --- the driver (vLLM's Python) -------------------------------------------------------------

def _shim() -> None:
    """vllm-cpu needs the CLI shim's metadata patch to find its CPU platform."""
    import runpy

    runpy.run_path(str(ROOT / "hpc_serve" / "demo" / "vllm_cpu_cli.py"), run_name="shim")
    sys.path.insert(0, str(ROOT))


def _drive_table(_payload):
    import vllm
    from vllm.engine.arg_utils import EngineArgs  # noqa: F401

    from hpc_serve.planner.vllm_parser import derive, vllm_serve_parser

    serve, fields = vllm_serve_parser()
    table = {dest: [kind, nargs, list(flags), list(negatives)]
             for dest, (kind, nargs, flags, negatives) in derive(serve, fields).items()}
    (a2a,) = [a for a in serve._actions if a.dest == "all2all_backend"]
    return {"table": table, "all2all_choices": sorted(a2a.choices), "version": vllm.__version__}


def _drive_resolve(words):
    from hpc_serve.planner.vllm_parser import _normalise, vllm_serve_parser

    serve, _ = vllm_serve_parser()
    serve.error = lambda message: (_ for _ in ()).throw(ValueError(message))
    out = {}
    for word in words:
        try:
            found = serve._parse_optional(_normalise(word))
        except ValueError as exc:
            out[word] = "ambiguous" if "ambiguous" in str(exc) else f"error: {exc}"
            continue
        if isinstance(found, list):  # Python >= 3.12.7 returns every match
            found = found[0] if len(found) == 1 else ("ambiguous" if found else None)
        out[word] = found if found in (None, "ambiguous") else (found[0].dest if found[0] else None)
    return out


def _drive_full(argvs):
    from hpc_serve.planner.vllm_parser import vllm_serve_parser

    serve, _ = vllm_serve_parser()
    base = vars(serve.parse_args(["m"]))
    out = []
    for argv in argvs:
        parsed = vars(serve.parse_args(["m", *argv]))
        out.append(sorted(k for k, v in parsed.items() if base.get(k) != v))
    return out


def _drive_configs(runs):
    import vllm.entrypoints.cli.serve as serve_module
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext

    from hpc_serve.planner.vllm_parser import vllm_serve_parser

    serve, _ = vllm_serve_parser()
    parser = serve  # the `serve` subparser: argv starts after "vllm serve"
    taken: list[str] = []
    serve_module.run_headless = lambda args: taken.append("headless")
    serve_module.run_multi_api_server = lambda args: taken.append("api")
    serve_module.run_server = lambda args: "api"
    serve_module.run_dp_supervisor = lambda args: taken.append("supervisor")
    serve_module.uvloop = type("uvloop", (), {"run": staticmethod(lambda what: taken.append(what))})
    out = []
    for run in runs:
        result: dict = {}
        saved = dict(os.environ)
        os.environ.update({k: v for k, v in run["env"].items() if k.startswith("VLLM_RAY")})
        try:
            try:
                args = parser.parse_args(run["argv"])
                args.subparser = "serve"
                serve_module.ServeSubcommand().validate(args)
            except (SystemExit, Exception) as exc:  # noqa: BLE001 (reported, then asserted on)
                out.append({"parse_error": repr(exc)})
                continue
            taken.clear()
            try:
                serve_module.ServeSubcommand.cmd(args)
                result["path"] = taken[-1] if taken else "none"
            except Exception as exc:  # noqa: BLE001
                result["dispatch_error"] = repr(exc)
            try:
                headless = result.get("path") == "headless"
                config = AsyncEngineArgs.from_cli_args(args).create_engine_config(
                    UsageContext.OPENAI_API_SERVER, headless=headless)
                p = config.parallel_config
                result["parallel"] = {key: getattr(p, key) for key in (
                    "tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size",
                    "data_parallel_size_local", "data_parallel_rank", "world_size", "nnodes",
                    "node_rank", "nnodes_within_dp", "node_rank_within_dp", "data_parallel_backend",
                    "distributed_executor_backend", "data_parallel_master_ip", "data_parallel_rpc_port",
                    "enable_expert_parallel", "data_parallel_hybrid_lb", "data_parallel_external_lb")}
                result["parallel"]["distributed_executor_backend"] = str(p.distributed_executor_backend)
            except Exception as exc:  # noqa: BLE001
                result["config_error"] = f"{type(exc).__name__}: {exc}"[:600]
        finally:
            os.environ.clear()
            os.environ.update(saved)
        out.append(result)
    return out


def _drive_placement(payload):
    import ray
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.platforms import current_platform
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.utils import CoreEngineActorManager

    from hpc_serve.planner.vllm_parser import vllm_serve_parser

    serve, _ = vllm_serve_parser()
    from ray._private.state import available_resources_per_node

    ray.init(address=payload["address"], logging_level="ERROR", log_to_driver=False)
    deadline = time.monotonic() + 120
    while sorted(r.get("GPU", 0) for r in available_resources_per_node().values()) != [8, 8]:
        assert time.monotonic() < deadline, available_resources_per_node()
        time.sleep(0.5)  # the worker node joins after the head
    type(current_platform).ray_device_key = "GPU"  # the CPU platform has "" (no Ray): see docstring
    out = []
    for argv in payload["runs"]:
        args = serve.parse_args(argv)
        args.model = args.model_tag
        config = AsyncEngineArgs.from_cli_args(args).create_engine_config(UsageContext.OPENAI_API_SERVER)
        try:
            groups, _ = CoreEngineActorManager.create_dp_placement_groups(config)
        except ValueError as exc:
            out.append({"error": str(exc)})
            continue
        ray.get([g.ready() for g in groups], timeout=60)
        from ray.util.placement_group import placement_group_table, remove_placement_group

        ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
        nodes = []
        for group in groups:
            bundles = placement_group_table(group)["bundles_to_node_id"]
            nodes.append(sorted({ips[node] for node in bundles.values()}))
            remove_placement_group(group)
        out.append({"nodes": [n[0] if len(n) == 1 else n for n in nodes]})
    return out


if __name__ == "__main__":
    _shim()
    mode = sys.argv[1]
    payload = json.loads(sys.stdin.read() or "null")
    result = {"table": _drive_table, "resolve": _drive_resolve, "full": _drive_full,
              "configs": _drive_configs, "placement": _drive_placement}[mode](payload)
    print("RESULT " + json.dumps(result), flush=True)
