"""The fleet's own logic: the key front (what it refuses, what it forwards, that it relays bytes
untouched), the membership read from the registry, and the keeper driving a real vllm-router
(installed with the test extra) in front of stand-in workers. Real replicas (vLLM on the Slurm
test cluster) are in tests/engine/test_fleet.py."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from hpc_serve.fleet.front import KeyFront, allowed_path, judge
from hpc_serve.fleet.keeper import FrontThread
from hpc_serve.fleet.members import Membership, slot_chain, slot_ended
from hpc_serve.registry import BEATS, ENDPOINT, JOB, MEMBERS, Registry

KEY = "k" * 64


def head(path: str, *headers: str, method: str = "GET") -> bytes:
    return "\r\n".join([f"{method} {path} HTTP/1.1", "Host: x", *headers]).encode()


@pytest.mark.parametrize("path", ["/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                                  "/health", "/tokenize", "/v1/audio/transcriptions"])
def test_inference_paths_are_let_through(path):
    assert allowed_path(path)


@pytest.mark.parametrize("path", ["/add_worker", "/remove_worker", "/list_workers", "/workers", "/flush_cache",
                                  "/get_loads", "/metrics", "/v1/../add_worker", "/v1//models", "/v1/./x", "/",
                                  "/v1", "/V1/models", "/v1/models%2f..%2fadd_worker"])
def test_admin_and_odd_paths_are_not(path):
    assert not allowed_path(path)


def test_a_request_without_the_key_or_with_another_is_refused_with_401():
    for headers in ((), ("Authorization: Bearer nope",), (f"Authorization: {KEY}",),
                    (f"Authorization: Bearer {KEY}x",)):
        refusal, _ = judge(head("/v1/models", *headers), KEY)
        assert refusal is not None and refusal.startswith(b"HTTP/1.1 401 ")
        assert b"www-authenticate: Bearer" in refusal


def test_admin_routes_are_404_even_with_the_key():
    refusal, _ = judge(head("/add_worker?url=http://evil:1", f"Authorization: Bearer {KEY}", method="POST"), KEY)
    assert refusal is not None and refusal.startswith(b"HTTP/1.1 404 ")


def test_the_forwarded_head_keeps_the_request_and_closes_the_connection():
    refusal, forwarded = judge(head("/v1/chat/completions?x=1", f"authorization:  Bearer {KEY}",
                                    "Connection: keep-alive", "Keep-Alive: timeout=5",
                                    "Content-Type: application/json", method="POST"), KEY)
    assert refusal is None
    lines = forwarded.split(b"\r\n")
    assert lines[0] == b"POST /v1/chat/completions?x=1 HTTP/1.1"
    assert f"authorization:  Bearer {KEY}".encode() in lines and b"Content-Type: application/json" in lines
    assert [line for line in lines if line.lower().startswith((b"connection", b"keep-alive"))] == \
        [b"Connection: close"]
    assert forwarded.endswith(b"\r\n\r\n")


def test_open_paths_need_no_key_and_no_key_means_open():
    assert judge(head("/health"), KEY)[0] is None
    assert judge(head("/v1/models"), "")[0] is None


@pytest.mark.parametrize("raw", [b"GARBAGE", b"GET x HTTP/1.1", b"GET /v1/models HTTP/1.1\r\nno-colon-here"])
def test_a_malformed_head_is_400(raw):
    assert judge(raw, KEY)[0].startswith(b"HTTP/1.1 400 ")


class Upstream:
    """A stand-in router: records each request head and answers with a streamed body."""

    def __init__(self) -> None:
        self.heads: list[str] = []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                upstream.heads.append(str(self.headers))
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                for part in (b"data: " + body + b"\n\n", b"data: [DONE]\n\n"):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")

            do_GET = do_POST

            def log_message(self, *_) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def front():
    upstream = Upstream()
    refused: list[str] = []
    thread = FrontThread(KeyFront(KEY, upstream.port, refused.append), "127.0.0.1")
    port = thread.start()
    yield port, upstream, refused
    thread.stop()
    upstream.server.shutdown()


def test_the_front_relays_a_stream_untouched_and_the_router_sees_connection_close(front):
    port, upstream, _ = front
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("POST", "/v1/chat/completions", body=b'{"stream": true}',
                       headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("content-type") == "text/event-stream"
    assert response.read() == b'data: {"stream": true}\n\ndata: [DONE]\n\n'
    assert len(upstream.heads) == 1 and "Connection: close" in upstream.heads[0]


def test_the_front_answers_refusals_itself_and_logs_them_without_the_key(front):
    port, upstream, refused = front
    for path, method, status in (("/v1/models", "GET", 401), ("/add_worker?url=http://x:1", "POST", 404)):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request(method, path, headers={"Authorization": f"Bearer {KEY}"} if status == 404 else {})
        response = connection.getresponse()
        assert response.status == status and json.loads(response.read())["error"]["code"] == status
    assert upstream.heads == []
    assert refused == ["GET /v1/models HTTP/1.1", "POST /add_worker?url=http://x:1 HTTP/1.1"]


def test_the_front_says_503_when_the_router_is_gone():
    thread = FrontThread(KeyFront(KEY, 1), "127.0.0.1")  # nothing listens on port 1
    port = thread.start()
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        assert connection.getresponse().status == 503
    finally:
        thread.stop()


# -- membership, from the registry alone ------------------------------------------------------

def replica(registry: Registry, dep_id: str, phase: str = "READY", base: str | None = None,
            successor: str | None = None, beat: int = 1):
    dep = registry.deployment(dep_id).ensure()
    dep.write(JOB, {"job_id": dep_id, "slurm_job_id": dep_id})
    dep.set_phase(phase, "test", **({"successor": successor} if successor else {}))
    if base:
        dep.write(ENDPOINT, {"base": base, "url": f"{base}/v1"})
    os.makedirs(dep.file(BEATS), exist_ok=True)
    dep.write(dep.rank_file(BEATS, 0), {"beat": beat})
    return dep


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_only_ready_replicas_with_an_endpoint_are_members(tmp_path):
    registry = Registry(str(tmp_path))
    replica(registry, "1", base="http://a:1")
    replica(registry, "2", phase="LOADING", base="http://b:1")
    replica(registry, "3")  # READY, endpoint withdrawn
    replica(registry, "4", phase="RESTARTING")
    assert Membership(registry).wanted(["1", "2", "3", "4"]) == {"http://a:1": "1"}


def test_a_renewed_slot_serves_through_its_successor_at_the_new_address(tmp_path):
    registry = Registry(str(tmp_path))
    replica(registry, "10", phase="STOPPED", successor="11")
    replica(registry, "11", base="http://new:2")
    assert [d.id for d in slot_chain(registry, "10")] == ["10", "11"]
    assert Membership(registry).wanted(["10"]) == {"http://new:2": "11"}
    assert not slot_ended(registry, "10")
    registry.deployment("11").set_phase("FAILED", "gone")
    assert slot_ended(registry, "10")


def test_during_a_hand_over_both_ends_of_the_chain_serve(tmp_path):
    registry = Registry(str(tmp_path))
    replica(registry, "20", base="http://old:1", successor="21")
    replica(registry, "21", base="http://new:1")
    assert Membership(registry).wanted(["20"]) == {"http://old:1": "20", "http://new:1": "21"}


def test_a_replica_whose_node_0_falls_silent_leaves(tmp_path):
    registry = Registry(str(tmp_path))
    dep = replica(registry, "30", base="http://a:1")
    clock = Clock()
    membership = Membership(registry, clock=clock, silent_s=10)
    assert membership.wanted(["30"]) == {"http://a:1": "30"}
    clock.now = 9
    assert membership.wanted(["30"])
    clock.now = 11
    assert membership.wanted(["30"]) == {}
    dep.write(dep.rank_file(BEATS, 0), {"beat": 2})  # it beats again: back in
    assert membership.wanted(["30"]) == {"http://a:1": "30"}


def test_a_chain_that_loops_ends(tmp_path):
    registry = Registry(str(tmp_path))
    replica(registry, "40", phase="STOPPED", successor="41")
    replica(registry, "41", phase="STOPPED", successor="40")
    assert [d.id for d in slot_chain(registry, "40")] == ["40", "41"]


# -- the keeper with a real vllm-router -------------------------------------------------------

ROUTER = shutil.which("vllm-router") or os.path.join(os.path.dirname(sys.executable), "vllm-router")
needs_router = pytest.mark.skipif(not os.access(ROUTER, os.X_OK),
                                  reason="vllm-router is not installed (pip install -e '.[test]')")


class Worker:
    """A stand-in replica: /health, and a chat answer that names the worker."""

    def __init__(self, name: str) -> None:
        worker, self.served = self, 0

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def answer(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.path.startswith("/v1/"):
                    worker.served += 1
                body = json.dumps({"worker": name, "auth": self.headers.get("authorization"),
                                   "data": [{"id": "m"}]}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = answer

            def log_message(self, *_) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def wait(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout_s} s: {what}")


def ask(port: int, key: str | None, path: str = "/v1/chat/completions") -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    connection.request("POST", path, body=json.dumps({"model": "m", "messages": []}), headers=headers)
    response = connection.getresponse()
    text = response.read()
    try:
        return response.status, json.loads(text)
    except ValueError:
        return response.status, {"text": text.decode(errors="replace")}


@pytest.fixture
def keeper(tmp_path):
    """A keeper (python -m hpc_serve.fleet.keeper) over two READY stand-in replicas whose beats move."""
    registry = Registry(str(tmp_path))
    workers = [Worker("one"), Worker("two")]
    for index, worker in enumerate(workers, 1):
        replica(registry, f"r{index}", base=worker.base)
    beating = threading.Event()

    def beat() -> None:
        count = 1
        while not beating.wait(1.0):
            count += 1
            for index in (1, 2):
                dep = registry.deployment(f"r{index}")
                dep.write(dep.rank_file(BEATS, 0), {"beat": count})

    threading.Thread(target=beat, daemon=True).start()
    child = subprocess.Popen([sys.executable, "-m", "hpc_serve.fleet.keeper", "--root", registry.root],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    dep = registry.deployment(f"local-{child.pid}").ensure()
    dep.write_secret("api_key", KEY)
    dep.write(JOB, {"kind": "router", "job_id": dep.id, "slurm_job_id": str(child.pid), "executor": "local",
                    "name": "grp", "slots": ["r1", "r2"], "router_cmd": ROUTER, "policy": "round_robin"})
    dep.init_phase("PENDING", "submitted")
    yield dep, registry, workers, child
    beating.set()
    if child.poll() is None:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    for worker in workers:
        worker.server.shutdown()


def log_of(dep) -> str:
    try:
        with open(dep.log_path(0)) as handle:
            return handle.read()
    except OSError:
        return ""


def members_of(dep) -> set[str]:
    return {m["id"] for m in (dep.read(MEMBERS, {}) or {}).get("members", [])}


@needs_router
def test_the_keeper_routes_to_ready_replicas_only_with_the_key_and_ends_cleanly(keeper):
    dep, registry, workers, child = keeper
    wait(lambda: dep.state.get("reason") == "2 of 2 replica(s) in the router", 60,
         f"both replicas in the router; log:\n{log_of(dep)}")
    assert dep.phase == "READY" and members_of(dep) == {"r1", "r2"}
    port = dep.endpoint["port"]
    answers = [ask(port, KEY) for _ in range(8)]
    assert {status for status, _ in answers} == {200}
    assert {body["worker"] for _, body in answers} == {"one", "two"}, "round robin over both"
    assert {body["auth"] for _, body in answers} == {f"Bearer {KEY}"}, "the replicas get the client's key"
    assert ask(port, None)[0] == 401 and ask(port, "wrong")[0] == 401
    assert ask(port, KEY, "/list_workers")[0] == 404

    # A replica that withdraws its endpoint (restart, cancel, hand-over) is out within a tick or two.
    registry.deployment("r1").remove(ENDPOINT)
    registry.deployment("r1").set_phase("RESTARTING", "test")
    wait(lambda: members_of(dep) == {"r2"}, 5, "r1 out of the router")
    wait(lambda: dep.state["reason"] == "1 of 2 replica(s) in the router", 2, "the group's reason")
    assert dep.phase == "READY"
    before = workers[0].served
    assert {ask(port, KEY)[1]["worker"] for _ in range(6)} == {"two"}
    assert workers[0].served == before
    # ... and back at its new address when READY again.
    moved = Worker("one-again")
    registry.deployment("r1").write(ENDPOINT, {"base": moved.base})
    registry.deployment("r1").set_phase("READY", "test")
    wait(lambda: members_of(dep) == {"r1", "r2"}, 60, "r1 back in")
    assert "one-again" in {ask(port, KEY)[1]["worker"] for _ in range(6)}
    requests = {m["id"]: m["requests"] for m in wait(lambda: all(
        m["requests"] for m in dep.read(MEMBERS, {})["members"]) and dep.read(MEMBERS)["members"], 10,
        "request counts in members.json")}
    assert requests["r2"] >= 6

    # A worker nobody put there (someone on the router's host, at its admin port) is removed.
    admin_port = int(re.search(r"vllm-router on 127\.0\.0\.1:(\d+)", log_of(dep)).group(1))
    intruder = Worker("intruder")
    add = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=40)
    add.request("POST", f"/add_worker?url={intruder.base}")
    add.getresponse().read()
    wait(lambda: "a worker hpc-serve did not add" in log_of(dep), 5, "the intruder removed")
    assert "intruder" not in {ask(port, KEY)[1]["worker"] for _ in range(6)}
    assert KEY not in log_of(dep)

    dep.mark_cancel()
    child.send_signal(signal.SIGTERM)
    assert child.wait(30) == 0
    assert dep.phase == "STOPPED" and "cancelled" in dep.state["reason"]
    assert not dep.endpoint and dep.read(MEMBERS) is None
    with pytest.raises(OSError):
        http.client.HTTPConnection("127.0.0.1", admin_port, timeout=2).request("GET", "/health")
    moved.server.shutdown()
    intruder.server.shutdown()


@needs_router
def test_vllm_router_does_not_outlive_a_killed_keeper(keeper):
    dep, _, _, child = keeper
    wait(lambda: dep.phase == "READY", 60, f"the group READY; log:\n{log_of(dep)}")
    (router,) = [int(pid) for pid in subprocess.run(["pgrep", "-P", str(child.pid)], capture_output=True,
                                                     text=True).stdout.split()]
    os.kill(child.pid, signal.SIGKILL)
    child.wait()

    def gone() -> bool:
        try:
            with open(f"/proc/{router}/stat") as handle:
                return handle.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie: it has exited
        except OSError:
            return True

    wait(gone, 10, f"vllm-router (pid {router}) to end with its keeper")


@needs_router
def test_the_keeper_ends_when_every_replica_has_ended(keeper):
    dep, registry, _, child = keeper
    wait(lambda: dep.phase == "READY", 60, f"the group READY; log:\n{log_of(dep)}")
    for index in (1, 2):  # both restart at once: the URL stays, but the group is not READY
        registry.deployment(f"r{index}").remove(ENDPOINT)
        registry.deployment(f"r{index}").set_phase("RESTARTING", "test")
    wait(lambda: dep.phase == "RESTARTING", 5, "the group RESTARTING")
    assert dep.state["reason"] == "0 of 2 replica(s) in the router" and dep.endpoint
    for index in (1, 2):
        registry.deployment(f"r{index}").set_phase("FAILED", "test")
    assert child.wait(30) == 0
    assert dep.phase == "STOPPED" and dep.state["reason"] == "every replica has ended"


# -- a replica leaving its router (node/publish.py) ----------------------------------------------

class Metrics:
    """A stand-in vLLM /metrics: ``running`` requests until told otherwise; records the auth header."""

    def __init__(self) -> None:
        self.running, self.auth = 1, []
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                metrics.auth.append(self.headers.get("authorization"))
                body = (f'vllm:num_requests_running{{engine="0",model_name="m"}} {float(metrics.running)}\n'
                        'vllm:num_requests_waiting{engine="0",model_name="m"} 0.0\n').encode()
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


class Run:
    """What leave_router reads of a NodeRun."""

    def __init__(self, dep) -> None:
        self.dep, self.lines, self.auth_headers = dep, [], {"Authorization": f"Bearer {KEY}"}

    def log(self, line: str) -> None:
        self.lines.append(line)


def group_replica(registry: Registry, base: str):
    router = registry.deployment("router").ensure()
    router.set_phase("READY", "1 of 1 replica(s) in the router")
    router.write(MEMBERS, {"members": [{"url": base, "id": "rep", "requests": 3}]})
    dep = registry.deployment("rep").ensure()
    dep.write(JOB, {"job_id": "rep", "router": "router"})
    return router, dep


def test_a_replica_waits_until_its_router_let_it_go_and_its_requests_are_done(tmp_path):
    from hpc_serve.node.publish import leave_router

    vllm = Metrics()
    router, dep = group_replica(Registry(str(tmp_path)), vllm.base)
    run = Run(dep)
    threading.Timer(0.4, lambda: router.write(MEMBERS, {"members": []})).start()
    threading.Timer(1.0, lambda: setattr(vllm, "running", 0)).start()
    started = time.monotonic()
    leave_router(run, vllm.base)
    took = time.monotonic() - started
    assert 0.9 <= took < 3, took
    assert run.lines == ["left the router router"] and set(vllm.auth) == {f"Bearer {KEY}"}
    vllm.server.shutdown()


def test_a_router_that_keeps_the_replica_is_waited_for_only_so_long(tmp_path, monkeypatch):
    from hpc_serve.node import publish

    monkeypatch.setattr(publish, "LEAVE_WAIT_S", 0.3)
    _, dep = group_replica(Registry(str(tmp_path)), "http://127.0.0.1:1")
    run = Run(dep)
    publish.leave_router(run, "http://127.0.0.1:1")
    assert run.lines == ["the router router still lists this replica after 0 s; going on"]


def test_a_replica_of_an_ended_router_and_a_plain_deployment_leave_at_once(tmp_path):
    from hpc_serve.node.publish import leave_router

    registry = Registry(str(tmp_path))
    router, dep = group_replica(registry, "http://127.0.0.1:1")
    router.set_phase("STOPPED", "cancelled")
    run = Run(dep)
    started = time.monotonic()
    leave_router(run, "http://127.0.0.1:1")  # nothing answers /metrics: nothing in flight
    plain = Run(replica(registry, "plain", base="http://127.0.0.1:1"))
    leave_router(plain, "http://127.0.0.1:1")
    assert time.monotonic() - started < 1 and plain.lines == []


# -- bad input never reaches sbatch (the CLI on a PATH without Slurm's tools) ---------------------

def cli(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpc_serve", *args], capture_output=True, text=True,
                          env={**os.environ, "PATH": os.path.dirname(sys.executable),
                               "HPC_SERVE_HOME": str(tmp_path / "home")})


@pytest.mark.parametrize("args, problem", [
    (("submit", "--replicas", "2", "--executor", "local"),
     "error: --replicas needs Slurm: each replica is its own Slurm job.\n"),
    (("submit", "--replicas", "2", "--auto-renew", "--time", "60"),
     "error: --auto-renew keeps the replicas past --time, but the router's Slurm job ends at --time (it is not "
     "renewed).\nAdd --router local"),
    (("submit", "--replicas", "2", "--router", "local", "--router-cmd", "no-such-router"),
     "error: The router's command 'no-such-router' is not on PATH (--router local runs it here).\n"),
    (("render", "--replicas", "2"), "error: render writes one job's script; --replicas makes several jobs"),
    (("submit", "--replicas", "0"), "error: --replicas must be between 1 and 64 (got 0).\n"),
    (("submit", "--replicas", "2", "--router-policy", "fastest"), "error: "),
    (("scale", "nosuch", "2"), "error: No deployment 'nosuch' in "),
])
def test_a_bad_group_request_is_refused_before_anything_is_submitted(tmp_path, args, problem):
    done = cli(tmp_path, *args[:1], "org/model", "--gpus-per-node", "1", *args[1:]) if args[0] != "scale" else \
        cli(tmp_path, *args)
    assert done.returncode == 2 and done.stderr.startswith(problem), done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "home" / "deployments").exists()
