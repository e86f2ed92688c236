"""The vLLM command line: built from the layout, and pass-through args that contradict it refused."""

import pytest

from hpc_serve.errors import HpcServeError
from hpc_serve.planner.launch import make_plan, node_plan
from hpc_serve.planner.spec import build_spec
from hpc_serve.planner.vllm_args import Runtime, engine_argv, served_model_name

RT = Runtime(node_ip="10.0.0.2", head_ip="10.0.0.1", api_port="20000", ray_port="20001",
             master_port="20002", dp_rpc_port="20003", ray_client_port="20004", tmp_dir="/tmp/hs-1")


def spec(**kwargs):
    return build_spec(**{"model": "org/m", "gpus_per_node": 8, **kwargs})


def flag(argv, name):
    return argv[argv.index(name) + 1]


def test_ray_tp_pp_only_the_head_runs_vllm():
    s = spec(nodes=2, tp=8, pp=2)
    head = engine_argv(s, 0, RT)
    assert head[:3] == ["vllm", "serve", "org/m"]
    assert flag(head, "--distributed-executor-backend") == "ray"
    assert flag(head, "--tensor-parallel-size") == "8" and flag(head, "--pipeline-parallel-size") == "2"
    assert flag(head, "--host") == "10.0.0.2" and flag(head, "--port") == "20000"
    assert engine_argv(s, 1, RT) is None


def test_ray_dp_uses_the_ray_dp_backend():
    head = engine_argv(spec(tp=8, dp=2, launcher="ray"), 0, RT)
    assert flag(head, "--data-parallel-size") == "2"
    assert flag(head, "--data-parallel-backend") == "ray"
    assert flag(head, "--data-parallel-address") == "10.0.0.1"


def test_ray_dp_with_replicas_spanning_nodes_sets_the_span_strategy():
    plan = node_plan(spec(nodes=4, tp=8, pp=2, dp=2, launcher="ray"), 0, RT)
    vllm = [p for p in plan.processes if p.name == "vllm"][0]
    assert ("VLLM_RAY_DP_PACK_STRATEGY", "span") in vllm.env


def test_mp_pp_across_nodes():
    s = spec(gpus_per_node=1, nodes=2, tp=1, pp=2, launcher="mp")
    head, follower = engine_argv(s, 0, RT), engine_argv(s, 1, RT)
    for rank, argv in enumerate((head, follower)):
        assert flag(argv, "--nnodes") == "2" and flag(argv, "--node-rank") == str(rank)
        assert flag(argv, "--master-addr") == "10.0.0.1" and flag(argv, "--master-port") == "20002"
        assert flag(argv, "--distributed-executor-backend") == "mp"
    assert "--headless" not in head and "--headless" in follower
    assert "--host" in head and "--host" not in follower


def test_mp_dp_across_nodes():
    s = spec(gpus_per_node=1, nodes=2, dp=2, launcher="mp")
    head, follower = engine_argv(s, 0, RT), engine_argv(s, 1, RT)
    assert flag(head, "--data-parallel-size") == "2"
    assert flag(head, "--data-parallel-size-local") == "1"
    assert flag(head, "--data-parallel-address") == "10.0.0.1"
    assert flag(head, "--data-parallel-rpc-port") == "20003"
    assert "--data-parallel-start-rank" not in head
    assert "--headless" in follower and flag(follower, "--data-parallel-start-rank") == "1"


def test_mp_dp_with_several_ranks_per_node():
    s = spec(gpus_per_node=8, nodes=2, tp=2, launcher="mp")
    assert flag(engine_argv(s, 1, RT), "--data-parallel-start-rank") == "4"
    assert flag(engine_argv(s, 0, RT), "--data-parallel-size-local") == "4"


def test_single_gpu_passes_no_distributed_backend():
    argv = engine_argv(spec(gpus_per_node=1), 0, RT)
    assert "--distributed-executor-backend" not in argv and "--nnodes" not in argv


def test_ep_adds_expert_parallel_and_default_all2all():
    argv = engine_argv(spec(tp=8, dp=2, ep=True), 0, RT)
    assert "--enable-expert-parallel" in argv
    assert flag(argv, "--all2all-backend") == "allgather_reducescatter"


def test_users_all2all_backend_wins_once():
    argv = engine_argv(spec(tp=8, dp=2, ep=True, vllm_args=["--all2all-backend", "deepep_low_latency"]), 0, RT)
    assert argv.count("--all2all-backend") == 1 and flag(argv, "--all2all-backend") == "deepep_low_latency"


def test_other_engine_commands_get_the_model_as_a_flag():
    argv = engine_argv(spec(gpus_per_node=1, engine_cmd="/opt/bin/launch-vllm --verbose"), 0, RT)
    assert argv[:3] == ["/opt/bin/launch-vllm", "--verbose", "--model"]


def test_the_vllm_cli_module_gets_the_model_as_its_positional():
    argv = engine_argv(spec(gpus_per_node=1, engine_cmd="python -m vllm.entrypoints.cli.main serve"), 0, RT)
    assert argv[:5] == ["python", "-m", "vllm.entrypoints.cli.main", "serve", "org/m"]


def test_passthrough_args_come_last_and_unchanged():
    argv = engine_argv(spec(gpus_per_node=1, vllm_args=["--max-model-len", "4096", "--enforce-eager"]), 0, RT)
    assert argv[-3:] == ["--max-model-len", "4096", "--enforce-eager"]


@pytest.mark.parametrize("args", [
    ["--tensor-parallel-size", "4"], ["-tp", "4"], ["--tensor_parallel_size=4"],
    ["--pipeline-parallel-size", "3"], ["-pp", "3"], ["--data-parallel-size", "4"],
    ["--distributed-executor-backend", "mp"], ["--nnodes", "3"], ["--headless"],
    ["--master-addr", "1.2.3.4"], ["--host", "0.0.0.0"], ["--port", "9000"], ["--model", "other"],
    ["--data-parallel-backend", "mp"], ["-dpl", "2"], ["--enable-expert-parallel"],
])
def test_passthrough_contradicting_the_layout_is_refused(args):
    with pytest.raises(HpcServeError, match="contradicts the layout") as err:
        spec(nodes=2, tp=8, pp=2, vllm_args=args)
    assert "instead" in err.value.hint


def test_passthrough_that_agrees_with_the_layout_is_dropped():
    s = spec(nodes=2, tp=8, pp=2, vllm_args=["--tensor-parallel-size", "8", "-pp=2", "--seed", "1"])
    argv = engine_argv(s, 0, RT)
    assert argv.count("--tensor-parallel-size") == 1 and "-pp=2" not in argv
    assert argv[-2:] == ["--seed", "1"]


def test_api_key_in_argv_is_refused():
    with pytest.raises(HpcServeError, match="--api-key") as err:
        spec(vllm_args=["--api-key", "sk-123"])
    assert "VLLM_API_KEY" in err.value.hint


def test_eplb_without_ep_is_refused_as_vllm_would():
    with pytest.raises(HpcServeError, match="--enable-eplb needs expert parallelism"):
        spec(tp=8, dp=2, vllm_args=["--enable-eplb"])


def test_served_model_name():
    assert served_model_name("org/m", ("--served-model-name", "short")) == "short"
    assert served_model_name("org/m", ()) == "org/m"


def test_plan_roles_and_placeholders():
    plan = make_plan(spec(nodes=2, tp=8, pp=2))
    assert [n.role for n in plan.nodes] == ["ray head + vllm api", "ray worker"]
    head_ray = plan.nodes[0].processes[0].argv
    assert "--head" in head_ray and "<ray-port>" in head_ray
    worker_ray = plan.nodes[1].processes[0].argv
    assert "<head-ip>:<ray-port>" in worker_ray and "--num-gpus" in worker_ray
    assert ("VLLM_HOST_IP", "<node-ip>") in plan.nodes[1].processes[0].env


def test_plan_for_4096_nodes_is_complete():
    plan = make_plan(spec(nodes=4096, tp=8, pp=4))
    assert len(plan.nodes) == 4096 and plan.spec.layout.dp == 1024


# --- issue 12 ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,local", [
    ({"tp": 8, "dp": 2, "launcher": "ray"}, "1"),                    # sbatch/tp8-dp2-ray.sbatch
    ({"tp": 8, "dp": 2, "ep": True}, "1"),                           # sbatch/moe-ep-two-nodes.sbatch
    ({"nodes": 2, "tp": 2, "launcher": "ray"}, "4"),                 # 4 DP ranks per node
    ({"nodes": 4, "tp": 8, "pp": 2, "dp": 2, "launcher": "ray"}, "1"),  # span: replicas of 2 nodes
])
def test_ray_dp_passes_the_local_dp_size(kwargs, local):
    # Without it vLLM takes the local size to be the whole DP size, and its strict packing refuses
    # to place them all on node 0 (defect 1).
    argv = engine_argv(spec(**kwargs), 0, RT)
    assert flag(argv, "--data-parallel-size-local") == local
    assert flag(argv, "--data-parallel-address") == "10.0.0.1"
    assert "--data-parallel-rpc-port" not in argv  # mp's handshake port: Ray DP does not use it


def test_api_server_options_go_to_the_api_node_only():
    # --api-server-count on a --headless follower makes it exit (vLLM's serve.py): defect 2.
    user = ["--api-server-count", "2", "--chat-template", "t.jinja", "--max-model-len", "4096",
            "--lora-modules", "a=/l/a", "b=/l/b", "--no-enable-flash-late-interaction", "--enforce-eager"]
    s = spec(gpus_per_node=1, nodes=2, dp=2, launcher="mp", vllm_args=user)
    head, follower = engine_argv(s, 0, RT), engine_argv(s, 1, RT)
    assert head[-len(user):] == user
    assert "--headless" in follower
    for api_only in ("--api-server-count", "--chat-template", "t.jinja", "--lora-modules", "a=/l/a"):
        assert api_only not in follower
    # engine options, and the one Frontend option vLLM copies into the engine config, go everywhere
    assert follower[-4:] == ["--max-model-len", "4096", "--no-enable-flash-late-interaction",
                             "--enforce-eager"]


def test_api_server_options_are_kept_for_a_ray_head():
    s = spec(tp=8, dp=2, launcher="ray", vllm_args=["--api-server-count", "4"])
    assert flag(engine_argv(s, 0, RT), "--api-server-count") == "4"


@pytest.mark.parametrize("args", [
    ["--data-parallel-hybrid-lb"], ["-dph"], ["--data-parallel-external-lb"], ["-dpe"],
    ["--data-parallel-multi-port-external-lb"], ["-dpm"], ["--data-parallel-rank", "1"],
    ["--tensor-parallel", "4"], ["--tensor", "4"], ["-t", "4"], ["--pipeline_parallel=3"],
    ["-n2"], ["-r", "1"], ["--head"], ["-pcp", "2"], ["--data-parallel-size-l", "2"],
])
def test_every_spelling_vllm_accepts_of_a_managed_flag_is_refused(args):
    with pytest.raises(HpcServeError, match="contradicts the layout") as err:
        spec(nodes=2, tp=8, pp=2, vllm_args=args)
    assert "instead" in err.value.hint


@pytest.mark.parametrize("args", [
    ["--no-enable-expert-parallel"], ["--disable-expert-parallel"], ["--no-enable-expert"],
])
def test_turning_ep_off_after_dashdash_is_refused(args):
    with pytest.raises(HpcServeError, match="contradicts the layout") as err:
        spec(tp=8, dp=2, ep=True, vllm_args=args)
    assert "--ep" in err.value.hint


def test_spellings_that_agree_with_the_layout_are_dropped():
    s = spec(nodes=2, tp=8, pp=2, vllm_args=["--tensor-parallel", "8", "-pp=2", "--no-enable-expert-parallel",
                                              "-pcp", "1", "--no-data-parallel-hybrid-lb", "--seed", "1"])
    argv = engine_argv(s, 0, RT)
    assert argv.count("--tensor-parallel-size") == 1 and "--tensor-parallel" not in argv
    assert "-pp=2" not in argv and "-pcp" not in argv and "--no-enable-expert-parallel" not in argv
    assert argv[-2:] == ["--seed", "1"]


@pytest.mark.parametrize("args", [["--api-server-count", "0"], ["-asc", "0"], ["--api-server-c=0"]])
def test_no_api_server_on_node_0_is_refused(args):
    with pytest.raises(HpcServeError, match="no API server") as err:
        spec(tp=8, dp=2, launcher="ray", vllm_args=args)
    assert "1 or more" in err.value.hint


@pytest.mark.parametrize("args,match", [
    (["--config", "c.yaml"], "config file"), (["--grpc"], "OpenAI HTTP server"),
    (["--uds", "/tmp/s"], "Unix socket"), (["--api-ke", "sk-1"], "ps"),
])
def test_options_that_bypass_the_check_or_the_endpoint_are_refused(args, match):
    with pytest.raises(HpcServeError, match=match):
        spec(gpus_per_node=1, vllm_args=args)


def test_an_abbreviation_vllm_finds_ambiguous_is_refused():
    with pytest.raises(HpcServeError, match="abbreviates several vLLM options") as err:
        spec(nodes=2, tp=8, pp=2, vllm_args=["--data-parallel", "2"])
    assert "in full" in err.value.hint


@pytest.mark.parametrize("kwargs", [
    {"all2all_backend": "pplx"}, {"all2all_backend": "naive"}, {"all2all_backend": "passthrough"},
    {"all2all_backend": "deepep"}, {"vllm_args": ["--all2all-backend", "pplx"]},
    {"vllm_args": ["--all2all-backend=bogus"]},
])
def test_all2all_backends_vllm_refuses_or_replaces_are_refused_before_queueing(kwargs):
    with pytest.raises(HpcServeError, match="all2all-backend") as err:
        spec(tp=8, dp=2, ep=True, **kwargs)
    assert "allgather_reducescatter" in err.value.hint or "Use one of" in err.value.hint


def test_valid_all2all_backends_pass():
    assert flag(engine_argv(spec(tp=8, dp=2, ep=True, all2all_backend="deepep_high_throughput"), 0, RT),
                "--all2all-backend") == "deepep_high_throughput"


def test_mp_dp_whose_replicas_span_nodes_runs_nnodes_inside_each_replica():
    # dp=2 replicas of tp=8 x pp=2 on four 8-GPU nodes (defect 8): vLLM splits --nnodes 4 into 2
    # replicas of 2 nodes (nnodes_within_dp) and infers each node's DP rank from --node-rank.
    s = spec(nodes=4, tp=8, pp=2, dp=2, launcher="mp")
    argvs = [engine_argv(s, rank, RT) for rank in range(4)]
    for rank, argv in enumerate(argvs):
        assert flag(argv, "--data-parallel-size") == "2" and flag(argv, "--data-parallel-size-local") == "1"
        assert flag(argv, "--nnodes") == "4" and flag(argv, "--node-rank") == str(rank)
        assert flag(argv, "--master-addr") == "10.0.0.1" and flag(argv, "--master-port") == "20002"
        assert flag(argv, "--data-parallel-address") == "10.0.0.1"
        assert flag(argv, "--data-parallel-rpc-port") == "20003"
        assert flag(argv, "--distributed-executor-backend") == "mp"
        assert "--data-parallel-start-rank" not in argv  # it would switch vLLM to hybrid LB
        assert ("--headless" in argv) == (rank > 0) and ("--host" in argv) == (rank == 0)
    assert [n.role for n in make_plan(s).nodes] == ["vllm api (rank 0)"] + [
        f"vllm headless (rank {r})" for r in (1, 2, 3)]
