"""Real vLLM (CPU build) serving a tiny model through hpc-serve on the real Slurm cluster."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from hpc_serve.demo import localcluster

from ..cluster.helpers import deployment_dir, job_processes, read_state, run_cli, squeue_ids, wait_for

pytestmark = pytest.mark.engine
ROOT = Path(__file__).resolve().parents[2]
VLLM_ARGS = ["--", "--max-model-len", "512"]


def submit(vllm_env, *layout, eager=True, model=None):
    done = run_cli("submit", "--no-wait", model or vllm_env.model, *layout, "--engine-cmd", vllm_env.engine_cmd,
                   "--env", "VLLM_CPU_KVCACHE_SPACE=1", *VLLM_ARGS, *(["--enforce-eager"] if eager else []))
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[1]


def wait_phase(home, job_id, phases, timeout):
    return wait_for(lambda: read_state(home, job_id).get("phase") in phases and read_state(home, job_id),
                    timeout, f"job {job_id} to reach {phases} (now {read_state(home, job_id).get('phase')})",
                    poll=0.5)


def endpoint(job_id):
    rows = json.loads(run_cli("status", job_id, "--json").stdout)
    return rows[0]["endpoint"]


def api_key(home, job_id):
    return (deployment_dir(home, job_id) / "api_key").read_text().strip()


def node_shm(cluster, node):
    """/dev/shm as the node sees it (its own tmpfs, in slurmd's mount namespace)."""
    pid = [p for p in localcluster.namespace_pids(cluster.namespace(node))
           if Path(f"/proc/{p}/comm").read_text().strip() == "slurmd"][0]
    done = subprocess.run(["nsenter", "-t", str(pid), "-m", "ls", "/dev/shm"], capture_output=True, text=True)
    return done.stdout.split()


def cancel_clean(cluster, home, job_id, nodes):
    assert run_cli("cancel", job_id).returncode == 0
    wait_for(lambda: job_id not in squeue_ids(cluster), 30, "the job to leave the queue")
    assert read_state(home, job_id)["phase"] == "STOPPED"
    wait_for(lambda: not any(job_processes(cluster).values()), 20, f"no process left ({job_processes(cluster)})")
    for node in cluster.nodes[:nodes]:
        assert node_shm(cluster, node) == [], node
        assert not (Path(cluster.state_dir) / "nodes" / node / "tmp" / f"hs-{job_id}").exists()


def check_the_key_is_required_and_never_shown(cluster, home, job_id, url, key):
    import urllib.error
    import urllib.request

    assert len(key) == 64 and (deployment_dir(home, job_id) / "api_key").stat().st_mode & 0o777 == 0o600
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{url}/models", timeout=10)
    assert refused.value.code == 401
    wrong = urllib.request.Request(f"{url}/models", headers={"Authorization": "Bearer not-the-key"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(wrong, timeout=10)
    assert refused.value.code == 401
    assert urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=10).status == 200  # open in vLLM
    for pid in filter(str.isdigit, os.listdir("/proc")):  # every process of every node (one PID space)
        try:
            assert key not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"), pid
        except OSError:
            continue
    record = subprocess.run(["scontrol", "show", "job", job_id], env=cluster.env, capture_output=True,
                            text=True, check=True).stdout
    assert record and key not in record
    written = [p for p in home.rglob("*") if p.is_file() and p.name != "api_key"]
    assert any(p.suffix == ".sh" for p in written)  # submitit's batch script is among them
    for path in written:
        assert key not in path.read_text(errors="replace"), path


def test_single_node_serves_the_openai_api(cluster, home, vllm_env):
    pytest.importorskip("openai")
    # submit waits by default: it returns once READY, with the endpoint and a tunnel command.
    done = run_cli("submit", vllm_env.model, "--gpus-per-node", "1", "--engine-cmd", vllm_env.engine_cmd,
                   "--env", "VLLM_CPU_KVCACHE_SPACE=1", "--timeout", "240", *VLLM_ARGS, "--enforce-eager",
                   timeout=400)
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.split()[1]
    state = read_state(home, job_id)
    assert state["phase"] == "READY", state["reason"]
    url = endpoint(job_id)
    assert f"READY: {url}" in done.stdout
    host_port = url.removeprefix("http://").removesuffix("/v1")
    assert f"ssh -N -L 127.0.0.1:8000:{host_port} " in done.stdout
    assert f"hpc-serve tunnel {job_id} --via " in done.stdout
    assert "LOADING" in done.stderr  # the progress lines
    def comment():
        return subprocess.run(["squeue", "--noheader", "--format=%k", "--jobs", job_id], env=cluster.env,
                              capture_output=True, text=True).stdout.strip()
    wait_for(lambda: comment() == url, 10, f"the job comment to be the URL (now {comment()!r})")
    assert [h["phase"] for h in state["history"]][-2:] == ["LOADING", "READY"]
    # where the start-up went: consecutive phases that add up to submission -> READY as recorded
    startup = json.loads(run_cli("status", job_id, "--json").stdout)[0]["startup"]
    names = [phase["phase"] for phase in startup]
    assert names[0] == "queued" and names[-1] == "READY (health and model checks)", names
    assert {"weights loaded", "API server up"} <= set(names), names
    recorded = state["history"][-1]["at"] - state["history"][0]["at"]  # READY minus PENDING
    assert abs(sum(phase["seconds"] for phase in startup) - recorded) < 1.0, (startup, recorded)
    assert f"start-up, {sum(phase['seconds'] for phase in startup):.1f} s to READY:" in run_cli("status", job_id).stdout
    url = endpoint(job_id)
    assert url.startswith(f"http://{cluster.node_ip('node1')}:") and url.endswith("/v1")
    key = api_key(home, job_id)
    assert f'export OPENAI_API_KEY="$(cat {deployment_dir(home, job_id) / "api_key"})"' in done.stdout
    check_the_key_is_required_and_never_shown(cluster, home, job_id, url, key)
    assert run_cli("endpoint", job_id).stdout.strip() == url
    exports = run_cli("endpoint", job_id, "--export").stdout.splitlines()
    assert exports == [f"export OPENAI_BASE_URL={url}",
                       f'export OPENAI_API_KEY="$(cat {deployment_dir(home, job_id) / "api_key"})"']
    described = json.loads(run_cli("endpoint", job_id, "--json").stdout)
    assert described["url"] == url and described["model"] == vllm_env.model
    assert described["host"] == cluster.node_ip("node1") and described["hostname"] == "node1"
    assert described["api_key_file"] == str(deployment_dir(home, job_id) / "api_key")
    from hpc_serve.client.handle import DeploymentHandle

    client = DeploymentHandle(str(home), job_id).openai_client()
    assert [m.id for m in client.models.list().data] == [vllm_env.model]
    completion = client.completions.create(model=vllm_env.model, prompt="Hello", max_tokens=4)
    assert completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == 4
    chat = client.chat.completions.create(model=vllm_env.model, max_tokens=4,
                                          messages=[{"role": "user", "content": "Hi"}])
    assert chat.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model=vllm_env.model, max_tokens=4, stream=True,
                                                 messages=[{"role": "user", "content": "Hi"}]))
    assert len(chunks) >= 2 and chunks[-1].choices[0].finish_reason == "length"
    cancel_clean(cluster, home, job_id, 1)


def fetched_cache(root: Path, model_dir: str, name: str) -> Path:
    """``model_dir`` as `hpc-serve fetch` leaves a hub model: ``name``'s snapshot in ``root``'s hub cache."""
    repo = root / "hub" / f"models--{name.replace('/', '--')}"
    sha = "0123456789abcdef0123456789abcdef01234567"
    shutil.rmtree(repo, ignore_errors=True)
    shutil.copytree(model_dir, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    return root


def test_offline_nodes_serve_a_hub_model_from_the_fetched_cache_and_refuse_one_not_fetched(cluster, home, vllm_env):
    pytest.importorskip("openai")
    empty = Path(cluster.shared_dir) / "hf-empty"
    refused = run_cli("submit", "hpc-serve-test/tiny-qwen2", "--gpus-per-node", "1", "--offline", "--hf-home",
                      str(empty), "--engine-cmd", vllm_env.engine_cmd)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "not in the Hugging Face cache" in refused.stderr and "hpc-serve fetch hpc-serve-test/tiny-qwen2" in refused.stderr
    assert squeue_ids(cluster) == [] and not (home / "deployments").exists()  # nothing queued, nothing recorded
    hf_home = fetched_cache(Path(cluster.shared_dir) / "hf", vllm_env.model, "hpc-serve-test/tiny-qwen2")
    done = run_cli("submit", "hpc-serve-test/tiny-qwen2", "--gpus-per-node", "1", "--offline", "--hf-home",
                   str(hf_home), "--engine-cmd", vllm_env.engine_cmd, "--env", "VLLM_CPU_KVCACHE_SPACE=1",
                   "--timeout", "240", *VLLM_ARGS, "--enforce-eager", timeout=400)
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.split()[1]
    import openai

    client = openai.OpenAI(base_url=endpoint(job_id), api_key=api_key(home, job_id))
    assert [m.id for m in client.models.list().data] == ["hpc-serve-test/tiny-qwen2"]
    answer = client.completions.create(model="hpc-serve-test/tiny-qwen2", prompt="Hi", max_tokens=3)
    assert answer.usage.completion_tokens == 3
    engines = []  # the vLLM server on the node (one PID space): offline, reading the fetched cache
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"serve" in words and b"hpc-serve-test/tiny-qwen2" in words:
                engines.append(dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes()
                                    .decode(errors="replace").split("\0") if "=" in item))
        except OSError:
            continue
    assert engines and all(e.get("HF_HUB_OFFLINE") == "1" and e.get("HF_HOME") == str(hf_home) for e in engines)
    cancel_clean(cluster, home, job_id, 1)


def test_pipeline_parallel_across_two_nodes(cluster, home, vllm_env):
    openai = pytest.importorskip("openai")
    # PP must run without --enforce-eager on the CPU build (see docs/engine.md).
    job_id = submit(vllm_env, "--nodes", "2", "--gpus-per-node", "1", "--pp", "2", "--launcher", "mp", eager=False)
    state = wait_phase(home, job_id, ("READY", "FAILED"), 300)
    assert state["phase"] == "READY", state["reason"]
    follower_log = (deployment_dir(home, job_id) / "logs" / "node-1.log").read_text()
    assert "--headless" in follower_log and f"tcp://{cluster.node_ip('node1')}" in follower_log
    client = openai.OpenAI(base_url=endpoint(job_id), api_key=api_key(home, job_id))
    assert client.completions.create(model=vllm_env.model, prompt="Hi", max_tokens=3).usage.completion_tokens == 3
    cancel_clean(cluster, home, job_id, 2)


def test_engine_failing_while_loading_is_failed_with_its_reason(cluster, home, vllm_env):
    broken = Path(cluster.shared_dir) / "model-without-weights"
    shutil.rmtree(broken, ignore_errors=True)
    shutil.copytree(vllm_env.model, broken, ignore=shutil.ignore_patterns("*.safetensors"))
    job_id = submit(vllm_env, "--gpus-per-node", "1", model=str(broken))
    state = wait_phase(home, job_id, ("READY", "FAILED"), 240)
    assert state["phase"] == "FAILED"
    assert "exited with code" in state["reason"] and "node 0 (node1)" in state["reason"]
    assert len(state["reason"].splitlines()) > 3  # vLLM's own last lines are in the reason
    wait_for(lambda: job_id not in squeue_ids(cluster), 30, "the failed job to end")
    shown = run_cli("status", job_id)
    assert "FAILED" in shown.stdout
    wait_for(lambda: not any(job_processes(cluster).values()), 20, "no process left")


@pytest.mark.parametrize("vllm_args, says", [
    (["--max-model-len", "100000"],
     "max_model_len 100000 is more than the model allows (512 tokens: max_position_embeddings in its "
     "config.json): pass -- --max-model-len 512 or less, or leave it out"),
    (["--max-model-len", "512", "--kv-cache-memory-bytes", "100000"],
     "the KV cache cannot hold one request of max_model_len 512"),
], ids=["max-model-len", "kv-cache"])
def test_a_known_error_is_failed_with_what_happened_and_what_to_change(cluster, home, vllm_env, vllm_args, says):
    # no VLLM_CPU_KVCACHE_SPACE here: it would override --kv-cache-memory-bytes
    done = run_cli("submit", "--no-wait", vllm_env.model, "--gpus-per-node", "1", "--engine-cmd", vllm_env.engine_cmd,
                   "--", *vllm_args, "--enforce-eager")
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.split()[1]
    state = wait_phase(home, job_id, ("READY", "FAILED"), 240)
    assert state["phase"] == "FAILED", state
    first = state["reason"].splitlines()[0]
    assert first.startswith(f"vllm on node 0 (node1) exited with code 1: {says}"), first
    assert "root error: " in state["reason"] and "last lines of its log:" in state["reason"]
    shown = run_cli("status", job_id)
    assert f"FAILED: {first}" in shown.stdout, shown.stdout  # the whole line, on the deployment's row
    wait_for(lambda: job_id not in squeue_ids(cluster), 30, "the failed job to end")
    wait_for(lambda: not any(job_processes(cluster).values()), 20, "no process left")


def test_every_scenario_argv_parses_with_vllms_own_parser(vllm_env):
    from hpc_serve.planner.launch import make_plan
    from hpc_serve.node.args import parse_node_args
    from hpc_serve.planner.spec import build_spec
    from hpc_serve.planner.vllm_args import Runtime

    rt = Runtime(node_ip="10.0.0.2", head_ip="10.0.0.1", api_port="20000", ray_port="20001",
                 master_port="20002", dp_rpc_port="20003", ray_client_port="20004", tmp_dir="/tmp/hs-1")
    argvs, expected = [], []
    for path in sorted((ROOT / "sbatch").glob("*.sbatch")):
        line = path.read_text().split("-m hpc_serve.node", 1)[1].split("\n")[0]
        words = line.replace('"$MODEL"', "org/model").split()
        spec = build_spec(executor="local", **parse_node_args(words))
        for node in make_plan(spec, rt).nodes:
            for process in node.processes:
                if process.name == "vllm":
                    argvs.append(list(process.argv))
                    expected.append((spec.layout, node.rank))
    done = subprocess.run([vllm_env.python, str(Path(__file__).parent / "parse_argv.py")],
                          input=json.dumps(argvs), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    parsed = json.loads(done.stdout)
    assert len(parsed) == len(argvs) >= 6
    for values, (layout, rank) in zip(parsed, expected):
        assert values != "rejected"
        assert values["tensor_parallel_size"] == layout.tp and values["pipeline_parallel_size"] == layout.pp
        assert values["data_parallel_size"] == layout.dp
        assert values["enable_expert_parallel"] == layout.ep
        assert values["model_tag"] == "org/model"


def test_tensor_parallel_across_two_nodes(cluster, home, vllm_env):
    openai = pytest.importorskip("openai")
    job_id = submit(vllm_env, "--nodes", "2", "--gpus-per-node", "1", "--tp", "2", "--cross-node-tp",
                    "--launcher", "mp")
    state = wait_phase(home, job_id, ("READY", "FAILED"), 300)
    assert state["phase"] == "READY", state["reason"]
    follower_log = (deployment_dir(home, job_id) / "logs" / "node-1.log").read_text()
    assert "--tensor-parallel-size 2" in follower_log and "--headless" in follower_log
    client = openai.OpenAI(base_url=endpoint(job_id), api_key=api_key(home, job_id))
    assert client.completions.create(model=vllm_env.model, prompt="Hi", max_tokens=3).usage.completion_tokens == 3
    cancel_clean(cluster, home, job_id, 2)


def test_data_parallel_across_two_nodes_serves_on_both_engines(cluster, home, vllm_env):
    openai = pytest.importorskip("openai")
    import urllib.request

    job_id = submit(vllm_env, "--nodes", "2", "--gpus-per-node", "1", "--dp", "2", "--launcher", "mp")
    state = wait_phase(home, job_id, ("READY", "FAILED"), 300)
    assert state["phase"] == "READY", state["reason"]
    url = endpoint(job_id)
    client = openai.OpenAI(base_url=url, api_key=api_key(home, job_id))
    for index in range(12):
        client.completions.create(model=vllm_env.model, prompt=f"Hello {index}", max_tokens=2)
    asked = urllib.request.Request(url.removesuffix("/v1") + "/metrics",
                                   headers={"Authorization": f"Bearer {api_key(home, job_id)}"})
    metrics = urllib.request.urlopen(asked, timeout=10).read().decode()  # /metrics needs the key too
    served = {}
    for line in metrics.splitlines():
        if line.startswith("vllm:request_success_total{") and 'engine="' in line:
            engine = line.split('engine="')[1].split('"')[0]
            served[engine] = served.get(engine, 0) + float(line.rsplit(" ", 1)[1])
    assert len(served) == 2 and all(count > 0 for count in served.values()), served
    cancel_clean(cluster, home, job_id, 2)
