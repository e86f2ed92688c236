"""An SSH tunnel from this machine to a deployment's endpoint, through a login host.

`ssh -N -L 127.0.0.1:<local>:<node>:<port> <login host>` with the user's own ssh config and known
hosts (host key checking is never turned off). The tunnel is supervised: if ssh dies after the
forward was up, it is started again; if the deployment restarts elsewhere (a requeue), the tunnel
follows its new endpoint and keeps the same local port. Stdlib only.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, replace
from typing import Callable, Optional, Tuple

from ..errors import HpcServeError
from ..planner.ports import port_open

#: Seconds to wait for ssh to open the forward (MFA prompts are answered within this).
CONNECT_TIMEOUT_S = float(os.environ.get("HPC_SERVE_TUNNEL_CONNECT_TIMEOUT", "120"))
RECONNECT_PAUSE_S = 1.0
FOLLOW_POLL_S = 2.0

#: Where the endpoint is now: (host, port), or None while the deployment is not serving.
Target = Callable[[], Optional[Tuple[str, int]]]


@dataclass(frozen=True)
class TunnelSpec:
    """Where a tunnel goes: the login host, the endpoint's host and port, and the local port."""

    via: str
    host: str
    port: int
    local_port: int
    control: bool = False
    ssh_cmd: str = "ssh"

    def argv(self) -> list[str]:
        """The ssh command line (no secret is in it)."""
        import shlex

        argv = [*shlex.split(self.ssh_cmd), "-N", "-L", f"127.0.0.1:{self.local_port}:{self.host}:{self.port}",
                "-o", "ExitOnForwardFailure=yes", "-o", "ServerAliveInterval=15",
                "-o", "ServerAliveCountMax=3"]
        if self.control:  # one MFA prompt for many tunnels: share one connection
            argv += ["-o", "ControlMaster=auto", "-o", "ControlPath=~/.ssh/hpc-serve-%C",
                     "-o", "ControlPersist=10m"]
        return [*argv, self.via]

    def up_line(self, pid: int | None = None) -> str:
        """The line that says this tunnel is open, where it leads, and through which host."""
        return f"tunnel up{f' (pid {pid})' if pid else ''}: {self.url} -> {self.host}:{self.port} via {self.via}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.local_port}/v1"


def free_local_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def check_local_port(port: int) -> None:
    """HpcServeError when ``port`` cannot be bound on 127.0.0.1."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            raise HpcServeError(f"Local port {port} is not free ({exc.strerror}).",
                                "Pick another with --local-port, or leave it out to get a free one.") from None


def _ssh_reason(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Warning: Permanently added", "debug"))]
    return (useful or lines or ["ssh gave no reason"])[-1]


class Tunnel:
    """One supervised ssh process."""

    def __init__(self, spec: TunnelSpec) -> None:
        self.spec = spec
        self.popen: subprocess.Popen | None = None

    def open(self) -> None:
        """Start ssh and wait until the local port forwards; HpcServeError with ssh's reason."""
        self.popen = subprocess.Popen(self.spec.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                reason = _ssh_reason(self.popen.stderr.read() if self.popen.stderr else "")
                raise HpcServeError(f"ssh to {self.spec.via} failed: {reason}",
                                    "Check that 'ssh " + self.spec.via + "' works on its own (host, key, "
                                    "known_hosts), then try again.")
            if port_open("127.0.0.1", self.spec.local_port):
                return
            time.sleep(0.05)
        self.close()
        raise HpcServeError(f"ssh to {self.spec.via} did not open the forward within {CONNECT_TIMEOUT_S:.0f} s.",
                            "Check that 'ssh " + self.spec.via + "' works on its own.")

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def close(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def supervise(self, say: Callable[[str], None], stop: Callable[[], bool] = lambda: False,
                  target: Target | None = None) -> None:
        """Keep the tunnel up until ``stop()``: when ssh dies, say why and open it again; when
        ``target()`` names another endpoint (the deployment restarted), forward there instead."""
        followed_at = time.monotonic()
        while not stop():
            if target is not None and time.monotonic() - followed_at >= FOLLOW_POLL_S:
                followed_at = time.monotonic()
                now = target()
                if now is not None and now != (self.spec.host, self.spec.port):
                    say(f"the endpoint moved to {now[0]}:{now[1]} (the deployment restarted); "
                        "re-opening the tunnel on the same local port")
                    self.close()
                    self.spec = replace(self.spec, host=now[0], port=now[1])
            if not self.alive:
                code = self.popen.returncode if self.popen else None
                reason = _ssh_reason(self.popen.stderr.read() if self.popen and self.popen.stderr else "")
                say(f"tunnel dropped (ssh exited with {code}: {reason}); reconnecting")
                try:
                    self.open()
                    say(f"tunnel back up: {self.spec.url}")
                except HpcServeError as exc:
                    say(f"reconnect failed: {exc.problem}; retrying in {RECONNECT_PAUSE_S:.0f} s")
                    time.sleep(RECONNECT_PAUSE_S)
                    continue
            time.sleep(0.2)


def endpoint_target(dep_path: str) -> Target:
    """The deployment's endpoint as its registry folder records it (or its successor's, once it
    handed over), read on each call."""
    from ..registry import read_json

    def current() -> tuple[str, int] | None:
        path = dep_path
        for _ in range(1000):  # along the successors of --auto-renew
            try:
                data = read_json(os.path.join(path, "endpoint.json"), {}) or {}
                state = read_json(os.path.join(path, "state.json"), {}) or {}
            except (OSError, HpcServeError):
                return None
            if data.get("host") and data.get("port"):
                return data["host"], int(data["port"])
            if not state.get("successor") or state.get("phase") != "STOPPED":
                return None
            path = os.path.join(os.path.dirname(path), state["successor"])
        return None

    return current


def run_background(spec: TunnelSpec, pid_file: str, log_file: str) -> None:
    """The body of `tunnel --background`: open, record the pid, supervise until SIGTERM."""
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    tunnel = Tunnel(spec)

    def say(message: str) -> None:
        with open(log_file, "a", encoding="utf-8") as handle:
            handle.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}\n")

    tunnel.open()
    say(spec.up_line())
    try:
        tunnel.supervise(say, stop=lambda: bool(stopping), target=endpoint_target(os.path.dirname(pid_file)))
    finally:
        tunnel.close()
        say("tunnel closed")
        if os.path.exists(pid_file):
            os.unlink(pid_file)


def tunnel_spec(key: str, via: str | None, local_port: int | None, control: bool = False,
                home: str | None = None, ssh_cmd: str = "ssh") -> tuple[TunnelSpec, dict]:
    """The tunnel to READY deployment ``key`` (and its endpoint record)."""
    from .control import endpoint

    if not via:
        raise HpcServeError("No login host to tunnel through.",
                            "Give --via [user@]login-host, or set login_host in your config profile.")
    data = endpoint(key, home)
    if local_port is None:
        local_port = free_local_port()
    else:
        check_local_port(local_port)
    return TunnelSpec(via, data["host"], int(data["port"]), local_port, control, ssh_cmd), data


def _tunnel_files(dep_path: str, local_port: int) -> tuple[str, str]:
    return (os.path.join(dep_path, f"tunnel-{local_port}.pid"), os.path.join(dep_path, f"tunnel-{local_port}.log"))


def start_background(spec: TunnelSpec, dep_path: str) -> int:
    """Start a detached supervisor for ``spec``; return its pid once the forward is up."""
    import json
    import sys

    pid_file, log_file = _tunnel_files(dep_path, spec.local_port)
    code = ("import json, sys; from hpc_serve.client.tunnel import TunnelSpec, run_background; "
            "run_background(TunnelSpec(**json.loads(sys.argv[1])), sys.argv[2], sys.argv[3])")
    fields = {"via": spec.via, "host": spec.host, "port": spec.port, "local_port": spec.local_port,
              "control": spec.control, "ssh_cmd": spec.ssh_cmd}
    log = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        child = subprocess.Popen([sys.executable, "-c", code, json.dumps(fields), pid_file, log_file],
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                                 env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    finally:
        os.close(log)
    fd = os.open(pid_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(str(child.pid))
    deadline = time.monotonic() + CONNECT_TIMEOUT_S + 5
    while time.monotonic() < deadline:
        if child.poll() is not None:
            if os.path.exists(pid_file):
                os.unlink(pid_file)
            with open(log_file, encoding="utf-8", errors="replace") as handle:
                lines = [line.strip() for line in handle if line.strip()]
            reason = next((l.split(": ", 1)[1] for l in reversed(lines) if l.startswith("hpc_serve.errors.HpcServeError")),
                          lines[-1] if lines else "no reason")
            raise HpcServeError(f"The background tunnel did not start: {reason}", f"Its log: {log_file}")
        if port_open("127.0.0.1", spec.local_port):
            return child.pid
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGTERM)
    raise HpcServeError("The background tunnel did not open its forward in time.", f"Its log: {log_file}")


def close_background(dep_path: str) -> list[int]:
    """End every background tunnel of a deployment; return the local ports that were closed."""
    closed = []
    for name in sorted(os.listdir(dep_path)):
        if name.startswith("tunnel-") and name.endswith(".pid"):
            path = os.path.join(dep_path, name)
            try:
                pid = int(open(path, encoding="utf-8").read().strip())
                os.kill(pid, signal.SIGTERM)
                closed.append(int(name[len("tunnel-"):-len(".pid")]))
            except (OSError, ValueError):
                pass
            deadline = time.monotonic() + 10
            while os.path.exists(path) and time.monotonic() < deadline:
                time.sleep(0.05)
            if os.path.exists(path):
                os.unlink(path)
    return closed
