"""The preflight's own logic: each node's checks, the reach check over real loopback sockets, the
NCCL transport read from its log, and the one failure reason made of every node's records."""

import socket

import pytest

from hpc_serve.node.checks import (MIN_SHM_FREE, gpu_problem, model_problem, socket_path_problem,
                                   space_problems)
from hpc_serve.node.fabric import Listeners, all_reduce, nccl_transport, reach, unreached
from hpc_serve.node.preflight import describe, verdict
from hpc_serve.planner.model_info import hub_snapshot

WHERE = "node 1 (gpu-07)"


@pytest.mark.parametrize("visible, per_node, problem", [
    (None, 8, None),  # no Slurm GPUs on this node (a CPU run): nothing to check
    ("0,1,2,3,4,5,6,7", 8, None),
    ("", 8, "node 1 (gpu-07) has no GPU: CUDA_VISIBLE_DEVICES is empty. Ask Slurm for GPUs (--gpus-per-node 8) "
            "and do not clear CUDA_VISIBLE_DEVICES in --setup"),
    ("0,1", 4, "node 1 (gpu-07) sees 2 GPU(s) (CUDA_VISIBLE_DEVICES=0,1) but the layout needs 4 per node: "
               "resubmit with --gpus-per-node 2"),
])
def test_the_gpus_cuda_will_see_must_be_as_many_as_the_layout_needs(visible, per_node, problem):
    env = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    assert gpu_problem(WHERE, per_node, env) == problem


def make_model(folder):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\0" * 16)
    return folder


def test_a_model_folder_must_be_on_the_node_with_its_config(tmp_path):
    model = make_model(tmp_path / "tiny")
    assert model_problem(WHERE, str(model), {}) is None
    assert model_problem(WHERE, str(tmp_path / "elsewhere"), {}) == (
        f"model folder {tmp_path / 'elsewhere'} is not on node 1 (gpu-07): put it on a filesystem every node "
        "sees, or copy it to the same path on every node")
    (model / "config.json").unlink()
    assert model_problem(WHERE, str(model), {}) == (
        f"{model / 'config.json'} is missing or unreadable on node 1 (gpu-07): is {model} a model folder?")


def test_a_hub_model_on_an_offline_node_must_be_in_its_cache(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    problem = model_problem(WHERE, "org/tiny", env)
    assert problem is not None and problem.startswith("org/tiny is not in the Hugging Face cache on node 1 "
                                                      "(gpu-07) and the node is offline (HF_HUB_OFFLINE)"), problem
    snapshot = make_model(tmp_path / "hf" / "hub" / "models--org--tiny" / "snapshots" / "abc123")
    assert hub_snapshot("org/tiny", env) == str(snapshot)
    assert model_problem(WHERE, "org/tiny", env) is None
    assert model_problem(WHERE, "org/other", {"HF_HUB_OFFLINE": "0"}) is None  # online: the Hub has it, or says so


def test_too_little_free_space_is_named_with_the_fix(tmp_path):
    problems, figures = space_problems(WHERE, {"shm": (str(tmp_path), 1 << 62), "tmp": (str(tmp_path / "new"), 1)})
    assert len(problems) == 1 and problems[0].startswith(f"node 1 (gpu-07): only ")
    assert problems[0].endswith(f"MiB free in {tmp_path} (shm); a start needs 4398046511104 MiB: free some "
                                "space (ask for a larger /dev/shm, e.g. a container's --shm-size)"), problems
    assert figures["tmp_free_gib"] == figures["shm_free_gib"] > 0  # a folder not made yet: its parent's
    assert MIN_SHM_FREE == 256 << 20


def test_a_temp_folder_too_long_for_unix_sockets_is_refused():
    assert socket_path_problem(WHERE, "/tmp/hs-123456") is None
    long = "/scratch/" + "x" * 40
    assert socket_path_problem(WHERE, long) == (
        f"the temp folder {long} on node 1 (gpu-07) is too long for Unix sockets (125 > 107 bytes with Ray's "
        "session path): use a shorter TMPDIR")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_listeners_answer_while_open_and_every_unreachable_port_is_listed():
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    closed = free_port()
    open_port = free_port()
    listeners = Listeners("127.0.0.1", [open_port, taken.getsockname()[1]])
    try:
        assert listeners.ports == [open_port] and listeners.refused == [taken.getsockname()[1]]
        assert reach("127.0.0.1", open_port) is None
        missing = unreached({2: {"ip": "127.0.0.1", "ports": [open_port, closed]}})
        assert missing == [{"to": 2, "ip": "127.0.0.1", "port": closed, "error": "Connection refused"}]
    finally:
        listeners.close()
        taken.close()
    assert reach("127.0.0.1", open_port) == "Connection refused"  # closed again: the engine may bind it


def test_an_engine_python_without_torch_skips_the_all_reduce_saying_so():
    result = all_reduce("python3", "127.0.0.1", free_port(), 0, 1, {"PYTHONPATH": ""}, timeout_s=20)
    assert "skipped" in result and "no torch in" in result["skipped"], result


def test_a_missing_engine_python_is_an_error_not_a_skip():
    result = all_reduce("/nonexistent/python", "127.0.0.1", 1, 0, 1, {})
    assert result == {"error": "could not run /nonexistent/python: No such file or directory"}


def test_the_network_nccl_chose_is_read_from_its_info_lines():
    log = ("gpu-07:1234:1234 [0] NCCL INFO NET/Plugin: No plugin found (libnccl-net.so)\n"
           "gpu-07:1234:1234 [0] NCCL INFO NET/IB : Using [0]mlx5_0:1/IB [1]mlx5_1:1/IB ; OOB ib0:10.1.0.7<0>\n"
           "gpu-07:1234:1234 [0] NCCL INFO Using network IB\n")
    assert nccl_transport(log) == "IB"
    assert nccl_transport("x NCCL INFO NET/Socket : Using [0]eth0:10.0.0.7<0>\ny NCCL INFO Using network Socket\n") \
        == "Socket"
    assert nccl_transport("no NCCL here") is None


NAMES = {0: "node 0 (gpu-01)", 1: "node 1 (gpu-02)", 2: "node 2 (gpu-03)"}


def test_every_node_passing_is_no_verdict():
    records = {rank: {"problems": [], "unreached": [], "all_reduce": {"gloo": {}}} for rank in NAMES}
    assert verdict(records, NAMES) is None


def test_the_verdict_names_each_pair_that_cannot_talk_and_each_nodes_problem():
    records = {
        0: {"problems": [], "unreached": []},
        1: {"problems": [], "unreached": [{"to": 2, "ip": "10.0.0.3", "port": 20045, "error": "Permission denied"}]},
        2: {"problems": ["model folder /m is not on node 2 (gpu-03): ..."],
            "unreached": [{"to": 1, "ip": "10.0.0.2", "port": 20045, "error": "no answer within 3 s"}]},
    }
    assert verdict(records, NAMES) == (
        "preflight failed: model folder /m is not on node 2 (gpu-03): ...; node 1 (gpu-02) cannot reach node 2 "
        "(gpu-03) at 10.0.0.3:20045: Permission denied; node 2 (gpu-03) cannot reach node 1 (gpu-02) at "
        "10.0.0.2:20045: no answer within 3 s; check the firewall between the nodes, or name the network they "
        "share (--network)")


def test_a_long_verdict_names_the_first_problems_and_counts_the_rest():
    records = {rank: {"problems": [f"problem {rank}.{i}" for i in range(3)]} for rank in NAMES}
    reason = verdict(records, NAMES)
    assert reason == ("preflight failed: problem 0.0; problem 0.1; problem 0.2; problem 1.0 "
                      "(and 5 more in `hpc-serve status`)")


def test_a_failed_all_reduce_is_named_by_its_node():
    records = {0: {"all_reduce": {"error": "the all-reduce failed (exit 1): Connection reset by peer"}}, 1: {}}
    assert verdict(records, NAMES) == ("preflight failed: node 0 (gpu-01): the all-reduce failed (exit 1): "
                                       "Connection reset by peer")


def test_a_record_is_described_in_a_few_words():
    record = {"took_s": 1.234, "unreached": [],
              "all_reduce": {"gloo": {"mib": 32, "seconds": 0.0712, "bus_gbps": 0.471},
                             "nccl": {"mib": 32, "seconds": 0.0021, "bus_gbps": 16.2, "transport": "IB"}}}
    assert describe(record) == ("1.23 s, reached every other node, gloo all-reduce of 32 MiB in 71.2 ms "
                                "(0.471 GB/s bus bandwidth), nccl all-reduce of 32 MiB in 2.1 ms (16.2 GB/s bus "
                                "bandwidth, over IB)")
    assert describe({"took_s": 0.01}) == "0.01 s"
    assert describe({"took_s": 0.5, "unreached": [{}, {}], "all_reduce": {"skipped": "no torch in /py"}}) == \
        "0.50 s, 2 port(s) of other nodes unreachable, all-reduce skipped: no torch in /py"


#: nvidia-smi's answers on a node with two H200s, GPU 1 mostly held by another job's process.
GPUS_CSV = ("0, GPU-1c2d0c1e-aaaa-bbbb-cccc-000000000000, 1, 143771\n"
            "1, GPU-9f8e7d6c-aaaa-bbbb-cccc-111111111111, 100864, 143771\n")
HOLDERS_CSV = "GPU-9f8e7d6c-aaaa-bbbb-cccc-111111111111, 4242, 100850\n"


@pytest.mark.parametrize("args, share", [
    ((), 0.9), (("--gpu-memory-utilization", "0.5"), 0.5),
    (("--max-model-len", "512", "--gpu-memory-utilization=0.3"), 0.3),
    (("--gpu_memory_utilization", "0.4"), 0.4),  # vLLM takes underscores
    (("--gpu-memory-utilization", "0.9", "--gpu-memory-utilization", "0.4"), 0.4),  # and the last one
    (("--gpu-memory-utilization", "lots"), None),  # vLLM will refuse it: nothing to check against
    (("--config", "serve.yaml"), None),  # the share may be inside
])
def test_the_share_of_gpu_memory_vllm_will_ask_for(args, share):
    from hpc_serve.node.checks import gpu_share

    assert gpu_share(args) == share


def test_a_gpu_another_process_holds_fails_the_node_naming_the_process():
    from hpc_serve.node.checks import gpu_memory_problems

    problems, free = gpu_memory_problems(WHERE, "0,1", 0.9, GPUS_CSV, HOLDERS_CSV)
    assert free == [140.4, 41.9]
    assert problems == [f"GPU 1 on {WHERE} has 41.9 of 140.4 GiB free, and vLLM will ask for 126.4 GiB "
                        "(--gpu-memory-utilization 0.9): another process holds it (pid 4242 (100850 MiB)). End it "
                        "(nvidia-smi shows it), or pass a lower -- --gpu-memory-utilization"]
    assert gpu_memory_problems(WHERE, "0,1", 0.25, GPUS_CSV)[0] == []  # 0.25 of 140 GiB fits in what is free
    assert gpu_memory_problems(WHERE, "0", 0.9, GPUS_CSV)[0] == []  # not this job's GPU
    by_uuid = gpu_memory_problems(WHERE, "GPU-9f8e7d6c-aaaa-bbbb-cccc-111111111111", 0.9, GPUS_CSV)[0]
    assert len(by_uuid) == 1 and by_uuid[0].startswith(f"GPU 1 on {WHERE} has 41.9")
    assert gpu_memory_problems(WHERE, "MIG-0f0f0f0f-aaaa", 0.9, GPUS_CSV) == ([], [])  # a MIG slice: not checked
    assert gpu_memory_problems(WHERE, None, 0.9, GPUS_CSV, per_node=1) == ([], [140.4])  # CUDA takes the first
    assert len(gpu_memory_problems(WHERE, None, 0.9, GPUS_CSV, per_node=2)[0]) == 1


def test_the_node_asks_nvidia_smi_about_its_own_gpus_and_for_the_holders_only_when_one_is_short(monkeypatch, tmp_path):
    from hpc_serve.node import checks
    from hpc_serve.planner.spec import build_spec

    asked = []

    def nvidia_smi(args):
        asked.append(args)
        return {"-L": "GPU 0: H200 (UUID: a)\nGPU 1: H200 (UUID: b)\n"}.get(args[-1]) or \
            (GPUS_CSV if args == checks.GPU_QUERY else HOLDERS_CSV)

    monkeypatch.setattr(checks, "nvidia_smi", nvidia_smi)
    spec = build_spec(model=str(tmp_path), gpus_per_node=1, vllm_args=["--gpu-memory-utilization", "0.5"])
    problems, figures = checks.node_checks(spec, WHERE, str(tmp_path), str(tmp_path), {"CUDA_VISIBLE_DEVICES": "1"})
    assert any(p.startswith("GPU 1") and "pid 4242" in p for p in problems), problems
    assert figures["gpu_free_gib"] == [41.9] and checks.HOLDERS_QUERY in asked
    asked.clear()
    problems, figures = checks.node_checks(spec, WHERE, str(tmp_path), str(tmp_path), {"CUDA_VISIBLE_DEVICES": "0"})
    assert not [p for p in problems if p.startswith("GPU")] and figures["gpu_free_gib"] == [140.4]
    assert checks.HOLDERS_QUERY not in asked
