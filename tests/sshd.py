"""A real, throwaway sshd on 127.0.0.1 for the tunnel tests and benchmark (root).

Its own config, host key and user keys in a temp folder; never the system's sshd config. Clients
use the ssh config file it writes (`ssh -F`), which keeps host key checking on.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"


def ensure_installed() -> None:
    """apt-get install openssh-server when sshd is missing."""
    if Path(SSHD).exists():
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], env=env, check=True, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "openssh-server"], env=env,
                   check=True, capture_output=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "hpc-serve-test", "-f", str(path)],
                   check=True)


class Sshd:
    """sshd -D on 127.0.0.1:<port>; hosts `login` (authorized key), `login-wrongkey` (a key it
    refuses) and `login-closed` (a port nobody listens on) in ``ssh_config``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)
        self.port = _free_port()
        for name in ("host_key", "user_key", "other_key"):
            _keygen(folder / name)
        shutil.copy(folder / "user_key.pub", folder / "authorized_keys")
        (folder / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {folder / 'host_key'}\n"
            f"AuthorizedKeysFile {folder / 'authorized_keys'}\nPidFile {folder / 'sshd.pid'}\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
            "PermitRootLogin prohibit-password\nAllowTcpForwarding yes\nUsePAM no\nStrictModes no\n"
            "LogLevel VERBOSE\nMaxStartups 100\n")
        host_key = (folder / "host_key.pub").read_text().split()[:2]
        (folder / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {' '.join(host_key)}\n")
        common = (f"  HostName 127.0.0.1\n  User root\n  IdentitiesOnly yes\n  BatchMode yes\n"
                  f"  UserKnownHostsFile {folder / 'known_hosts'}\n  StrictHostKeyChecking yes\n")
        (folder / "ssh_config").write_text(
            f"Host login\n  Port {self.port}\n  IdentityFile {folder / 'user_key'}\n{common}"
            f"Host login-wrongkey\n  Port {self.port}\n  IdentityFile {folder / 'other_key'}\n{common}"
            f"Host login-closed\n  Port {_free_port()}\n  IdentityFile {folder / 'user_key'}\n{common}")
        self.ssh_cmd = f"ssh -F {folder / 'ssh_config'}"
        self.popen: subprocess.Popen | None = None

    def start(self) -> "Sshd":
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation folder
        log = open(self.folder / "sshd.log", "ab")
        self.popen = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.folder / "sshd_config")],
                                      stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                if self.popen.poll() is not None:
                    raise RuntimeError((self.folder / "sshd.log").read_text()[-500:]) from None
                time.sleep(0.05)
        raise RuntimeError("sshd did not listen within 10 s")

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            os.killpg(self.popen.pid, 15)
            self.popen.wait(10)
