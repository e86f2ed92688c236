"""The vLLM command line: built from the layout, and pass-through args that contradict it refused."""

import pytest

from hpc_serve.errors import HpcServeError
from hpc_serve.launch import make_plan, node_plan
from hpc_serve.spec import build_spec
from hpc_serve.vllm_args import Runtime, engine_argv, served_model_name

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
    argv = engine_argv(spec(gpus_per_node=1, engine_cmd="python -m vllm.entrypoints.openai.api_server"), 0, RT)
    assert argv[:4] == ["python", "-m", "vllm.entrypoints.openai.api_server", "--model"]


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
