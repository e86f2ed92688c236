"""A real multi-node Slurm cluster on one Linux machine, for tests and `hpc-serve demo`.

Each node is its own network namespace (own IP, hostname, /tmp and /dev/shm) running a real
slurmd; the controller and munged run in the root namespace; every node has 8 fake GPUs through
gres. Needs root and Debian/Ubuntu packages (installed when missing). `down()` removes every
daemon, namespace, bridge and /etc entry it made, and is safe to run twice.

    python -m hpc_serve.demo.localcluster up --nodes 4     # by hand
    python -m hpc_serve.demo.localcluster down
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import HpcServeError

STATE_DIR = Path(os.environ.get("HPC_SERVE_CLUSTER_DIR", "/var/lib/hpc-serve-cluster"))
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge", "iproute2", "util-linux")
BRIDGE, SUBNET = "hsbr0", "10.99.0"
CONTROLLER_IP = f"{SUBNET}.1"
GPUS_PER_NODE = 8
CPUS_PER_NODE = 8
HOSTS_BEGIN, HOSTS_END = "# BEGIN hpc-serve test cluster", "# END hpc-serve test cluster"
SLURM_LINK = Path("/etc/slurm/slurm.conf")


@dataclass
class Cluster:
    """A running cluster: where its config is and how to reach it."""

    nodes: list[str]
    state_dir: str
    shared_dir: str
    slurm_conf: str
    partition: str = "debug"

    def node_ip(self, node: str) -> str:
        return f"{SUBNET}.{10 + int(node.removeprefix('node'))}"

    def namespace(self, node: str) -> str:
        return f"hs-{node}"

    @property
    def env(self) -> dict[str, str]:
        """Environment for Slurm client commands."""
        return {**os.environ, "SLURM_CONF": self.slurm_conf}


def _run(*argv: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if check and done.returncode != 0:
        raise HpcServeError(f"`{' '.join(argv)}` failed: {(done.stderr or done.stdout).strip()[-400:]}",
                            "See the message above; `python -m hpc_serve.demo.localcluster down` cleans up.")
    return done


def require_root() -> None:
    if os.geteuid() != 0:
        raise HpcServeError("The local Slurm cluster (tests, demo) needs root: it makes network namespaces "
                            "and runs slurmd.",
                            "Run it as root on a throwaway Debian/Ubuntu machine or VM.")
    if not shutil.which("apt-get") and not all(shutil.which(c) for c in ("slurmctld", "slurmd", "munged")):
        raise HpcServeError("The local test cluster needs Debian/Ubuntu packages (apt-get) or Slurm installed.",
                            f"Install {', '.join(PACKAGES)} by hand.")


def install_packages() -> None:
    """apt-get install the Slurm and munge packages when any daemon is missing."""
    if all(shutil.which(c) for c in ("slurmctld", "slurmd", "sbatch", "munged", "nsenter")):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run("apt-get", "update", "-qq", env=env)
    _run("apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES, env=env)


def _slurm_conf(nodes: list[str], state: Path) -> str:
    host = socket.gethostname()
    lines = [
        "ClusterName=hpcserve",
        f"SlurmctldHost={host}({CONTROLLER_IP})",
        "SlurmUser=root",
        "AuthType=auth/munge",
        f"StateSaveLocation={state}/ctld",
        f"SlurmdSpoolDir={state}/spool/%n",
        f"SlurmctldPidFile={state}/slurmctld.pid",
        f"SlurmdPidFile={state}/spool/%n/slurmd.pid",
        f"SlurmctldLogFile={state}/log/slurmctld.log",
        f"SlurmdLogFile={state}/log/slurmd-%n.log",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SchedulerParameters=batch_sched_delay=0",
        "SlurmdParameters=config_overrides",
        "EnforcePartLimits=ALL",
        "KillWait=5",
        "ReturnToService=2",
        "MpiDefault=none",
        "GresTypes=gpu",
    ]
    for node in nodes:
        ip = f"{SUBNET}.{10 + int(node.removeprefix('node'))}"
        lines.append(f"NodeName={node} NodeAddr={ip} NodeHostname={node} CPUs={CPUS_PER_NODE} "
                     f"RealMemory=16000 Gres=gpu:{GPUS_PER_NODE} State=UNKNOWN")
    lines.append(f"PartitionName=debug Nodes={','.join(nodes)} Default=YES MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


def _gres_conf(state: Path) -> str:
    return (f"AutoDetect=off\nName=gpu File={state}/dev/gpu[0-{GPUS_PER_NODE - 1}]\n")


def _hosts_block(nodes: list[str]) -> str:
    entries = [f"{SUBNET}.{10 + int(n.removeprefix('node'))} {n}" for n in nodes]
    return "\n".join([HOSTS_BEGIN, *entries, HOSTS_END]) + "\n"


def _edit_hosts(block: str | None) -> None:
    text = Path("/etc/hosts").read_text()
    if HOSTS_BEGIN in text:
        head, _, rest = text.partition(HOSTS_BEGIN)
        text = head + rest.partition(HOSTS_END)[2].lstrip("\n")
    Path("/etc/hosts").write_text(text + (block or ""))


def _start_munged(state: Path) -> None:
    if daemon_pids(("munged",)) and Path("/run/munge/munge.socket.2").exists():
        return
    run_dir = Path("/run/munge")
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.chown(run_dir, "munge", "munge")
    if not Path("/etc/munge/munge.key").exists():
        _run("mungekey", "--create")
        shutil.chown("/etc/munge/munge.key", "munge", "munge")
    _run("runuser", "-u", "munge", "--", "munged")
    (state / "munged.ours").write_text("1")


def _network(nodes: list[str]) -> None:
    _run("ip", "link", "add", BRIDGE, "type", "bridge")
    _run("ip", "addr", "add", f"{CONTROLLER_IP}/24", "dev", BRIDGE)
    _run("ip", "link", "set", BRIDGE, "up")
    for node in nodes:
        index = int(node.removeprefix("node"))
        ns, host_end = f"hs-{node}", f"hsv{index}"
        _run("ip", "netns", "add", ns)
        _run("ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _run("ip", "link", "set", host_end, "master", BRIDGE)
        _run("ip", "link", "set", host_end, "up")
        _run("ip", "-n", ns, "addr", "add", f"{SUBNET}.{10 + index}/24", "dev", "eth0")
        _run("ip", "-n", ns, "link", "set", "eth0", "up")
        _run("ip", "-n", ns, "link", "set", "lo", "up")


def _visible_paths() -> list[str]:
    """Paths under /tmp that nodes must still see (this interpreter, this package)."""
    keep = {sys.prefix, str(Path(__file__).resolve().parents[2])}  # the checkout holding hpc_serve
    return sorted(p for p in keep if p == "/tmp" or p.startswith("/tmp/"))


def _start_slurmd(node: str, state: Path, conf: Path) -> int:
    node_dir = state / "nodes" / node
    (node_dir / "tmp").mkdir(parents=True, exist_ok=True)
    (node_dir / "tmp").chmod(0o1777)
    (state / "spool" / node).mkdir(parents=True, exist_ok=True)
    # Keep the machine's /tmp reachable at host-tmp, so paths under it that nodes need
    # (this interpreter, this package) can be bound back into the node's private /tmp.
    (node_dir / "host-tmp").mkdir(exist_ok=True)
    rebind = "".join(f"mkdir -p {p}; mount --bind {node_dir}/host-tmp{p[len('/tmp'):]} {p}; "
                     for p in _visible_paths())
    script = (
        f"hostname {node}; mount --bind /tmp {node_dir}/host-tmp; "
        f"mount --bind {node_dir}/tmp /tmp; {rebind}"
        "mount -t tmpfs -o size=4g tmpfs /dev/shm; "
        f"exec slurmd -D -N {node} -f {conf}"
    )
    log = open(state / "log" / f"slurmd-{node}.stdout", "ab")
    process = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/hs-{node}", "unshare", "--uts", "--mount",
         "--propagation", "private", "sh", "-c", script],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "SLURM_CONF": str(conf)},
    )
    return process.pid


def _wait_idle(cluster: Cluster, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        done = _run("sinfo", "--noheader", "--Node", "--format=%N %t", check=False, env=cluster.env)
        states = dict(line.split() for line in done.stdout.splitlines() if line.strip())
        if states and all(states.get(n) == "idle" for n in cluster.nodes):
            return
        time.sleep(0.2)
    missing = [n for n in cluster.nodes if states.get(n) != "idle"]
    tail = ""
    if missing:
        log = Path(cluster.state_dir) / "log" / f"slurmd-{missing[0]}.log"
        tail = log.read_text()[-300:] if log.exists() else "(no slurmd log)"
    raise HpcServeError(f"Nodes {', '.join(missing)} did not become idle within {timeout:.0f} s "
                        f"(states: {states}).", f"slurmd log of {missing[0] if missing else '?'}: {tail}")


def up(nodes: int = 2, state_dir: Path = STATE_DIR) -> Cluster:
    """Start a cluster of ``nodes`` nodes (tearing down any previous one first)."""
    require_root()
    install_packages()
    down(state_dir)
    names = [f"node{i}" for i in range(1, nodes + 1)]
    state = Path(state_dir)
    for sub in ("ctld", "log", "spool", "nodes", "dev", "shared"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    (state / "shared").chmod(0o1777)
    for index in range(GPUS_PER_NODE):
        device = state / "dev" / f"gpu{index}"
        if not device.exists():
            os.mknod(device, 0o666 | 0o020000, os.makedev(1, 3))
    conf = state / "slurm.conf"
    conf.write_text(_slurm_conf(names, state))
    (state / "gres.conf").write_text(_gres_conf(state))
    cluster = Cluster(names, str(state), str(state / "shared"), str(conf))
    (state / "cluster.json").write_text(json.dumps(asdict(cluster), indent=2))
    if not SLURM_LINK.exists():
        SLURM_LINK.parent.mkdir(parents=True, exist_ok=True)
        SLURM_LINK.symlink_to(conf)
        (state / "slurm-link.ours").write_text(str(SLURM_LINK))
    _edit_hosts(_hosts_block(names))
    _network(names)
    _start_munged(state)
    _run("slurmctld", "-f", str(conf), env=cluster.env)
    pids = {node: _start_slurmd(node, state, conf) for node in names}
    (state / "slurmd.pids").write_text(json.dumps(pids))
    _wait_idle(cluster)
    return cluster


def current(state_dir: Path = STATE_DIR) -> Cluster | None:
    """The running cluster described in ``state_dir``, or None."""
    path = Path(state_dir) / "cluster.json"
    return Cluster(**json.loads(path.read_text())) if path.exists() else None


def _kill_pid(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(pid: int) -> bool:
    """Running and not a zombie (PID 1 here reaps orphans lazily, so zombies linger)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def daemon_pids(names: tuple[str, ...] = ("slurmd", "slurmctld", "slurmstepd")) -> list[int]:
    """Live (non-zombie) processes with one of these command names."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                comm = Path(f"/proc/{entry}/comm").read_text().strip()
            except OSError:
                continue
            if comm in names and _alive(int(entry)):
                found.append(int(entry))
    return found


def namespace_pids(namespace: str) -> list[int]:
    """Live processes in a node's network namespace (zombies excluded)."""
    done = _run("ip", "netns", "pids", namespace, check=False)
    return [int(word) for word in done.stdout.split() if _alive(int(word))]


def down(state_dir: Path = STATE_DIR) -> None:
    """Stop every daemon and remove every namespace, link and /etc entry the cluster made."""
    state = Path(state_dir)
    pid_file = state / "slurmctld.pid"
    if pid_file.exists():
        try:
            _kill_pid(int(pid_file.read_text().strip()))
        except ValueError:
            pass
    pids_file = state / "slurmd.pids"
    if pids_file.exists():
        for pid in json.loads(pids_file.read_text()).values():
            _kill_pid(int(pid))
    namespaces = _run("ip", "netns", "list", check=False).stdout.split("\n") if shutil.which("ip") else []
    for line in namespaces:
        ns = line.split(" ")[0]
        if ns.startswith("hs-node"):
            for pid in namespace_pids(ns):
                _kill_pid(pid)
            _run("ip", "netns", "delete", ns, check=False)
    if shutil.which("ip"):
        _run("ip", "link", "delete", BRIDGE, check=False)
        # A deleted namespace's veth pair goes away asynchronously: delete our ends now, so that
        # an `up` right after this finds the names free.
        links = _run("ip", "-o", "link", check=False).stdout.splitlines()
        for name in {line.split(":")[1].strip().split("@")[0] for line in links if ":" in line}:
            if re.fullmatch(r"hsv\d+", name):
                _run("ip", "link", "delete", name, check=False)
    deadline = time.monotonic() + 10
    while daemon_pids() and time.monotonic() < deadline:  # SIGKILL is sent; wait for it to land
        time.sleep(0.05)
    if (state / "munged.ours").exists():
        for pid in daemon_pids(("munged",)):
            _kill_pid(pid)
        deadline = time.monotonic() + 10
        while daemon_pids(("munged",)) and time.monotonic() < deadline:
            time.sleep(0.05)
        (state / "munged.ours").unlink()
    link_marker = state / "slurm-link.ours"
    if link_marker.exists():
        if SLURM_LINK.is_symlink():
            SLURM_LINK.unlink()
        link_marker.unlink()
    if Path("/etc/hosts").exists() and HOSTS_BEGIN in Path("/etc/hosts").read_text():
        _edit_hosts(None)
    for name in ("cluster.json", "slurmd.pids"):
        (state / name).unlink(missing_ok=True)
    if (state / "nodes").exists():
        shutil.rmtree(state / "nodes", ignore_errors=True)
    if (state / "ctld").exists():
        shutil.rmtree(state / "ctld", ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m hpc_serve.demo.localcluster", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("up", help="start (or restart) the cluster")
    start.add_argument("--nodes", type=int, default=2)
    sub.add_parser("down", help="stop it and remove everything it made")
    sub.add_parser("status", help="show the nodes")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            cluster = up(args.nodes)
            print(f"cluster up: {', '.join(cluster.nodes)}; export SLURM_CONF={cluster.slurm_conf}")
            print(f"shared folder (seen by every node): {cluster.shared_dir}")
        elif args.command == "down":
            down()
            print("cluster down")
        else:
            cluster = current()
            if cluster is None:
                print("no cluster")
                return 1
            print(_run("sinfo", "--Node", env=cluster.env).stdout, end="")
    except HpcServeError as exc:
        exc.report()
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
