"""Replicas behind vllm-router (docs/fleet.md), on the real cluster with real vLLM CPU replicas and
the real vllm-router: one URL, one key, requests that keep succeeding while a replica fails,
restarts, is cancelled or hands over to its successor."""

import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from ..cluster.helpers import HPC_SERVE, allocated_nodes, job_processes, read_state, run_cli, squeue_ids, wait_for
from .test_engine import VLLM_ARGS, wait_phase
from .test_faults import engine_pids, requeue_released

pytestmark = pytest.mark.engine


def submit_group(vllm_env, name: str, *options: str) -> dict:
    done = run_cli("submit", "--no-wait", vllm_env.model, "--gpus-per-node", "1", "--launcher", "mp",
                   "--engine-cmd", vllm_env.engine_cmd, "--env", "VLLM_CPU_KVCACHE_SPACE=1", "--name", name,
                   *options, *VLLM_ARGS, "--enforce-eager")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"submitted group {name}: "), done.stdout
    return group_status(name)


def group_status(name: str) -> dict:
    shown = run_cli("status", name, "--json")
    assert shown.returncode == 0, shown.stderr
    return json.loads(shown.stdout)


def slots(home: Path, router_id: str) -> list[str]:
    return json.loads((home / "deployments" / router_id / "job.json").read_text())["slots"]


def members(home: Path, router_id: str) -> dict[str, str]:
    """Replica id -> URL of what the keeper put in the router."""
    try:
        listed = json.loads((home / "deployments" / router_id / "members.json").read_text())["members"]
    except (OSError, ValueError):
        return {}
    return {entry["id"]: entry["url"] for entry in listed}


def routed(home: Path, router_id: str) -> int:
    """Requests the router has sent in all, from members.json (refreshed every 2 s)."""
    try:
        listed = json.loads((home / "deployments" / router_id / "members.json").read_text())["members"]
    except (OSError, ValueError):
        return 0
    return sum(entry.get("requests", 0) for entry in listed)


def under_way(home: Path, router_id: str, more: int = 8) -> None:
    """Until the router has sent ``more`` requests beyond what it had: the load is on."""
    before = routed(home, router_id)
    wait_for(lambda: routed(home, router_id) >= before + more, 60, "the load under way")


def served_requests(base: str, key: str) -> float:
    """Requests the replica at ``base`` answered, from its own /metrics."""
    request = urllib.request.Request(f"{base}/metrics", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    return sum(float(value) for value in re.findall(r"^vllm:request_success_total\{[^}]*\}\s+(\S+)$", text, re.M))


def status_code(url: str, key: str | None = None, method: str = "GET") -> int:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None,
                                     headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as refused:
        return refused.code


class Load:
    """`hpc-serve bench` against the group, in the background: ``prompts`` requests at ``rate``/s."""

    def __init__(self, name: str, prompts: int, rate: float) -> None:
        self.process = subprocess.Popen(
            [*HPC_SERVE, "bench", name, "--prompts", str(prompts), "--rate", str(rate), "--input-len", "16",
             "--output-len", "8", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def running(self) -> bool:
        return self.process.poll() is None

    def result(self, timeout_s: float = 300) -> dict:
        out, err = self.process.communicate(timeout=timeout_s)
        assert self.process.returncode in (0, 1), err[-3000:]  # 1: the run ended, some requests failed
        result = next(iter(json.loads(out).values()))
        assert self.process.returncode == (1 if result["failed"] else 0), (self.process.returncode, result)
        return result


def kill_engine(cluster, replica: str) -> str:
    node = allocated_nodes(cluster, replica)[0]
    victims = engine_pids(cluster, node, replica, 0)
    assert victims, f"no vLLM process of {replica} on {node}"
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return node


def test_two_replicas_serve_through_one_url_and_keep_serving_through_a_restart_and_a_cancel(
        cluster, home, vllm_env):
    openai = pytest.importorskip("openai")
    import hpc_serve

    row = submit_group(vllm_env, "grp", "--replicas", "2", "--exclusive", "--max-restarts", "1",
                       "--router-policy", "round_robin")
    router = row["id"]
    first, second = slots(home, router)
    taken = run_cli("submit", "--no-wait", vllm_env.model, "--replicas", "2", "--name", "grp", "--gpus-per-node", "1")
    assert taken.returncode == 2 and "A live group is already named 'grp'." in taken.stderr, taken.stderr
    assert len(squeue_ids(cluster)) == 3  # nothing more reached sbatch
    state = wait_phase(home, router, ("READY", "FAILED", "STOPPED"), 300)
    assert state["phase"] == "READY", state["reason"]
    wait_for(lambda: read_state(home, router)["reason"] == "2 of 2 replica(s) in the router", 120,
             "both replicas in the router")
    assert set(members(home, router)) == {first, second}
    nodes = {replica: allocated_nodes(cluster, replica)[0] for replica in (first, second)}
    assert len(set(nodes.values())) == 2, nodes  # --exclusive: one node each
    url = run_cli("endpoint", "grp").stdout.strip()
    comment = subprocess.run(["squeue", "-h", "-j", router, "-o", "%k"], env=cluster.env, capture_output=True,
                             text=True).stdout.strip()
    assert comment == url  # published like a deployment's
    key = (home / "deployments" / router / "api_key").read_text()
    assert all((home / "deployments" / r / "api_key").read_text() == key for r in (first, second))

    # One URL, one key: the openai client through the router (chat, stream, completion).
    group = hpc_serve.deployment("grp")
    assert group.endpoint["url"] == url
    client = group.openai_client(max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    for _ in range(2):
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=4)
        assert reply.choices[0].finish_reason in ("length", "stop")
        chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                                     max_tokens=4, stream=True))
        assert len(chunks) >= 2 and chunks[-1].choices[0].finish_reason in ("length", "stop")
        assert client.completions.create(model=model, prompt="Hi", max_tokens=4).choices[0].text is not None
    replica_bases = {r: members(home, router)[r] for r in (first, second)}
    answered = {r: served_requests(base, key) for r, base in replica_bases.items()}
    assert all(count >= 2 for count in answered.values()), answered  # both replicas served

    # No path without the key; the router's admin routes not at all.
    assert status_code(f"{url}/models") == 401 and status_code(f"{url}/models", "wrong") == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    base = url.removesuffix("/v1")
    assert status_code(f"{base}/list_workers", key) == 404
    assert status_code(f"{base}/add_worker?url=http://10.99.0.1:1", key, "POST") == 404
    for replica_base in replica_bases.values():
        assert status_code(f"{replica_base}/v1/models") == 401
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            assert key not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"), pid
        except OSError:
            continue
    for job in (router, first, second):
        record = subprocess.run(["scontrol", "show", "job", job], env=cluster.env, capture_output=True,
                                text=True, check=True).stdout
        assert key not in record, job
    for path in (home / "deployments").rglob("*"):
        if path.is_file() and path.name != "api_key":
            assert key not in path.read_text(errors="replace"), path

    shown = run_cli("status", "grp").stdout
    assert "router of 2 (slurm)" in shown and "in the router (requests sent to each):" in shown, shown
    assert "grp-1" in shown and "grp-2" in shown and replica_bases[first] in shown, shown

    # vLLM of the first replica dies under load: it leaves, restarts (--max-restarts 1) and rejoins.
    load = Load("grp", prompts=120, rate=4)
    under_way(home, router)
    killed_on = kill_engine(cluster, first)
    killed_at = time.time()
    wait_for(lambda: first not in members(home, router), 15, "the failed replica out of the router")
    left_s = time.time() - killed_at
    requeue_released(cluster, first, exclude=killed_on)
    state = wait_phase(home, first, ("READY", "FAILED"), 300)
    assert state["phase"] == "READY" and state["restart"] == 1, state["reason"]
    wait_for(lambda: first in members(home, router), 60, "the restarted replica back in the router")
    assert members(home, router)[first] != replica_bases[first]  # at its new address
    restart = load.result()
    print(f"vLLM killed under load: {restart['failed']} of {restart['completed'] + restart['failed']} failed, "
          f"out of the router {left_s:.1f} s after")
    assert restart["failed"] <= 4 and restart["completed"] + restart["failed"] == 120, restart

    # scancel the second under load: only what it had in flight may fail, nothing after it left.
    load = Load("grp", prompts=60, rate=4)
    under_way(home, router)
    subprocess.run(["scancel", second], env=cluster.env, check=True)
    wait_for(lambda: second not in members(home, router), 15, "the cancelled replica out of the router")
    cancelled = load.result()
    print(f"scancel under load: {cancelled['failed']} of 60 failed")
    assert cancelled["failed"] <= 2 and cancelled["completed"] + cancelled["failed"] == 60, cancelled
    wait_for(lambda: read_state(home, router)["reason"] == "1 of 2 replica(s) in the router", 5, "1 of 2")

    # scale back to 2, then cancel the whole group: the router and every replica end.
    scaled = run_cli("scale", "grp", "2")
    assert scaled.returncode == 0 and "submitted 1 replica(s)" in scaled.stdout, scaled.stderr
    third = slots(home, router)[-1]
    assert third not in (first, second)
    wait_for(lambda: third in members(home, router), 300, "the added replica in the router")
    done = run_cli("cancel", "grp")
    assert done.returncode == 0 and "cancelled group grp: the router" in done.stdout, done.stderr
    for job in (router, first, third):
        assert read_state(home, job)["phase"] == "STOPPED", job
    wait_for(lambda: not squeue_ids(cluster), 30, "every job of the group to end")
    wait_for(lambda: not any(job_processes(cluster).values()), 20, f"no process left ({job_processes(cluster)})")
    assert json.loads(run_cli("list", "--json").stdout) == []


class Clients:
    """``count`` clients sending chat requests through the group's URL, ``pause_s`` apart, until
    stopped; every failure kept with what it said."""

    def __init__(self, url: str, key: str, model: str, count: int = 2, pause_s: float = 0.1) -> None:
        import threading

        self.url, self.key, self.model, self.pause_s = url, key, model, pause_s
        self.done, self.failed = 0, []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(count)]
        for thread in self.threads:
            thread.start()

    def _client(self) -> None:
        body = json.dumps({"model": self.model, "max_tokens": 4,
                           "messages": [{"role": "user", "content": "Hi"}]}).encode()
        while not self.stopping.is_set():
            request = urllib.request.Request(f"{self.url}/chat/completions", data=body, headers={
                "Authorization": f"Bearer {self.key}", "Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    assert json.loads(response.read())["choices"]
                self.done += 1
            except Exception as exc:  # noqa: BLE001 - every failure is counted
                self.failed.append(f"{time.strftime('%H:%M:%S')} {exc!r}")
            self.stopping.wait(self.pause_s)

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(70)


def test_a_replica_hands_over_to_its_successor_under_load_without_a_failed_request(cluster, home, vllm_env):
    # 8 minutes, renewed 7 minutes before the end: the successor is submitted once the first is READY,
    # and has 5 minutes (to Slurm's time-limit signal) to load while the first serves the load.
    # Every node of the test cluster is the same 2 CPUs, and vLLM's CPU build binds its worker to
    # CPU 0 and spins there while it serves: unbound (nobind), the successor's worker can start.
    row = submit_group(vllm_env, "renewing", "--replicas", "1", "--router", "local", "--time", "8",
                       "--auto-renew", "--renew-before", "7", "--exclusive", "--env",
                       "VLLM_CPU_OMP_THREADS_BIND=nobind")
    router = row["id"]
    assert router.startswith("local-")
    (first,) = slots(home, router)
    state = wait_phase(home, router, ("READY", "FAILED", "STOPPED"), 300)
    assert state["phase"] == "READY", state["reason"]
    endpoint = json.loads(run_cli("endpoint", "renewing", "--json").stdout)
    key = (home / "deployments" / router / "api_key").read_text()
    successor = wait_for(lambda: read_state(home, first).get("successor"), 60, "the successor's submission")
    clients = Clients(endpoint["url"], key, endpoint["served_model"], count=1, pause_s=0.3)
    try:
        ended = wait_phase(home, first, ("STOPPED", "TIMEOUT", "FAILED"), 300)
        assert ended["reason"].startswith(f"replaced by its successor {successor}"), ended["reason"]
        wait_for(lambda: set(members(home, router)) == {successor}, 10, "only the successor in the router")
        served_before = clients.done
        wait_for(lambda: clients.done >= served_before + 10, 60, "the load served by the successor")
    finally:
        clients.stop()
    print(f"hand-over under load: {len(clients.failed)} of {clients.done + len(clients.failed)} failed")
    assert clients.failed == [] and clients.done > 30, (clients.done, clients.failed[:5])
    log = (home / "deployments" / first / "logs" / "node-0.log").read_text()
    assert f"left the router {router}" in log, log[-2000:]
    assert run_cli("endpoint", "renewing").stdout.strip() == endpoint["url"]  # the group's URL stays
    done = run_cli("cancel", "renewing")
    assert done.returncode == 0, done.stderr
    wait_for(lambda: not squeue_ids(cluster), 30, "every job of the group to end")
    assert json.loads(run_cli("list", "--json").stdout) == []
