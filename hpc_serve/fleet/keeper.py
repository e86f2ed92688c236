"""The group's keeper: vllm-router, the key front and the membership, in one process. Stdlib only.

It runs as the group's own small Slurm job (the group's URL also in the job's comment), or on the
submitting machine (``--router local``), under the router's registry entry ``deployments/<id>/``:
spec.json (the replicas' spec), job.json
(``kind: router``, ``slots``: the replicas' ids, the router's command and policy), api_key (the
group's), state.json, endpoint.json (the front's address, once a replica is in), members.json
(who is in the router and how many requests each got) and logs/node-0.log (`hpc-serve logs NAME`).

Every ``TICK_S`` it makes the router's workers what the registry says serves (fleet/members.py):
removals at once, additions off the loop (vllm-router's add waits for the worker's /health), and
any worker nobody put there removed. It ends, recording why, on SIGTERM (cancel), on the
time-limit signal, when vllm-router dies, and when every replica has ended.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from ..registry import API_KEY, CANCEL, ENDPOINT, JOB, MEMBERS, TERMINAL, Deployment, Registry
from ..node.engine import parent_death_hook
from ..node.polling import wait_until
from .front import KeyFront
from .members import Membership, slot_ended
from .router import RouterAdmin, router_argv

TICK_S = 0.25
#: How often the members' request counts are refreshed in members.json.
COUNTS_EVERY_S = 2.0
ROUTER_START_S = 60.0


def free_port() -> int:
    """A port of 127.0.0.1 that nothing holds now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class FrontThread:
    """The key front's asyncio loop, in a thread of its own."""

    def __init__(self, front: KeyFront, host: str) -> None:
        self.front, self.host = front, host
        self.port: int | None = None
        self.failed: BaseException | None = None
        self._started = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="front", daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._stop = asyncio.Event()
            await self.front.serve(self.host, 0, self._on_started, self._stop)

        try:
            self._loop.run_until_complete(main())
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self.failed = exc
            self._started.set()

    def _on_started(self, port: int) -> None:
        self.port = port
        self._started.set()

    def start(self) -> int:
        self._thread.start()
        self._started.wait(30)
        if self.port is None:
            raise OSError(f"the front could not listen on {self.host}: {self.failed}")
        return self.port

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)


class Keeper:
    """One group's router, front and membership."""

    def __init__(self, dep: Deployment, host: str, hostname: str) -> None:
        self.dep, self.host, self.hostname = dep, host, hostname
        self.registry = Registry(dep.root)
        self.membership = Membership(self.registry)
        self.ending: tuple[str, str] | None = None
        self.adding: dict[str, threading.Thread] = {}
        self.members: dict[str, str] = {}
        self.counts: dict[str, int] = {}
        self.published = False
        self._log = open(dep.log_path(0), "a", encoding="utf-8", buffering=1)  # noqa: SIM115

    def log(self, message: str) -> None:
        self._log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} [router] {message}\n")

    def _signal(self, signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if self.ending is None:
            if name in ("SIGUSR1", "SIGUSR2"):
                self.ending = ("TIMEOUT", f"the router's job reached its time limit ({name})")
            elif os.path.exists(self.dep.file(CANCEL)):
                self.ending = ("STOPPED", "cancelled (hpc-serve cancel)")
            else:
                self.ending = ("STOPPED", f"received {name}")

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(signum, self._signal)
        job = self.dep.job
        port, metrics_port = free_port(), free_port()
        argv = router_argv(job.get("router_cmd", "vllm-router"), port, metrics_port, job.get("policy", "round_robin"))
        self.dep.set_phase("STARTING", "starting vllm-router")
        self.log(f"starting: {' '.join(argv)}")
        try:
            router = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
                                      start_new_session=True, preexec_fn=parent_death_hook())  # dies with us
        except OSError as exc:
            return self._end("FAILED", f"cannot start vllm-router ({argv[0]}: {exc.strerror}); install it on "
                                       "the router's host: pip install 'hpc-serve[fleet]', or give --router-cmd")
        admin, front = RouterAdmin(port, metrics_port), None
        try:
            deadline = time.monotonic() + ROUTER_START_S
            while not admin.ready():
                if router.poll() is not None or time.monotonic() > deadline or self.ending:
                    why = f"exited with code {router.returncode}" if router.poll() is not None else \
                        f"did not answer in {ROUTER_START_S:.0f} s" if not self.ending else ""
                    return self._end(*(self.ending or ("FAILED", f"vllm-router {why}; see hpc-serve logs {self.dep.id}")))
                time.sleep(0.1)
            front = FrontThread(KeyFront(self.dep.api_key, port, self._refused), self.host)
            self.front_port = front.start()
            self.log(f"vllm-router on 127.0.0.1:{port}; the key front on {self.host}:{self.front_port}")
            self.dep.set_phase("STARTING", "waiting for a replica to be READY")
            return self._loop(router, admin)
        finally:
            if front is not None:
                front.stop()
            if router.poll() is None:
                router.terminate()
                try:
                    router.wait(10)
                except subprocess.TimeoutExpired:
                    router.kill()
                    router.wait()

    def _refused(self, request_line: str) -> None:
        self.log(f"refused: {request_line}")

    def _loop(self, router: subprocess.Popen, admin: RouterAdmin) -> int:
        counted_at = 0.0
        while True:
            if self.ending:
                return self._end(*self.ending)
            if router.poll() is not None:
                return self._end("FAILED", f"vllm-router exited with code {router.returncode}; "
                                           f"see hpc-serve logs {self.dep.id}")
            slots = list(self.dep.job.get("slots", []))
            if slots and all(slot_ended(self.registry, slot) for slot in slots):
                return self._end("STOPPED", "every replica has ended")
            changed = self._reconcile(admin, self.membership.wanted(slots))
            if changed or time.monotonic() - counted_at > COUNTS_EVERY_S:
                counted_at = time.monotonic()
                try:
                    self.counts = admin.requests_per_worker()
                except OSError:
                    pass
                self._write_members(len(slots))
            time.sleep(TICK_S)

    def _reconcile(self, admin: RouterAdmin, wanted: dict[str, str]) -> bool:
        """Make the router's workers ``wanted``; whether its members changed."""
        try:
            current = set(admin.workers())
        except OSError as exc:
            self.log(f"cannot list the router's workers: {exc}")
            return False
        changed = False
        for url in sorted(current - set(wanted)):
            done, said = admin.remove(url)
            who = self.members.get(url, "a worker hpc-serve did not add")
            self.log(f"removed {url} ({who}): {said}" if done else f"could not remove {url}: {said}")
            changed = True
        for url in sorted(set(wanted) - current):
            if url not in self.adding or not self.adding[url].is_alive():
                self.adding[url] = threading.Thread(target=self._add, args=(admin, url, wanted[url]), daemon=True)
                self.adding[url].start()
        now = {url: wanted[url] for url in current & set(wanted)}
        changed = changed or now != self.members
        self.members = now
        return changed

    def _add(self, admin: RouterAdmin, url: str, dep_id: str) -> None:
        try:
            done, said = admin.add(url)
        except OSError as exc:
            done, said = False, str(exc)
        self.log(f"added {url} (replica {dep_id})" if done else f"could not add {url} (replica {dep_id}): {said}")

    def _write_members(self, slots: int) -> None:
        members = [{"url": url, "id": dep_id, "requests": self.counts.get(url, 0)}
                   for url, dep_id in sorted(self.members.items())]
        self.dep.write(MEMBERS, {"members": members, "at": time.time()})
        serving = f"{len(members)} of {slots} replica(s) in the router"
        if members and not self.published:
            self._publish(members[0]["id"])
        phase = "READY" if members else "RESTARTING"  # the URL stays; nothing serves behind it now
        state = self.dep.state
        if self.published and state.get("reason") != serving and state.get("phase") not in TERMINAL:
            self.dep.set_phase(phase, serving)

    def _publish(self, first_member: str) -> None:
        served = self.registry.deployment(first_member).endpoint
        url = f"http://{self.host}:{self.front_port}"
        self.dep.write(ENDPOINT, {"url": f"{url}/v1", "base": url, "host": self.host, "hostname": self.hostname,
                                  "port": self.front_port, "model": served.get("model"),
                                  "served_model": served.get("served_model"),
                                  "api_key_file": self.dep.file(API_KEY) if self.dep.api_key else None})
        self.published = True
        self._comment(f"{url}/v1")
        self.log(f"READY at {url}/v1")

    def _comment(self, text: str) -> None:
        """The group's URL in the router job's Slurm comment (``squeue -o %k``), as a deployment's."""
        if self.dep.job.get("executor") == "slurm":
            from ..node.publish import set_job_comment

            set_job_comment(self.dep.slurm_job_id, text, self.log)

    def _end(self, phase: str, reason: str) -> int:
        self.dep.remove(ENDPOINT)
        self.dep.remove(MEMBERS)
        if self.dep.phase not in TERMINAL:
            self.dep.set_phase(phase, reason)
        if self.published:
            self._comment("")
        self.log(f"{phase}: {reason}")
        return 0 if phase != "FAILED" else 1


def _address() -> tuple[str, str]:
    from ..node.netaddr import choose_address

    hostname = socket.gethostname()
    return choose_address(os.environ.get("HPC_SERVE_ROUTER_NETWORK"), hostname=hostname).ip, hostname


def run_task(root: str) -> int:
    """The router's Slurm job (submitit calls this): its id is the job's."""
    dep = Registry(root).deployment(os.environ["SLURM_JOB_ID"])
    host, hostname = _address()
    return Keeper(dep, host, hostname).run()


def main(argv: list[str] | None = None) -> int:
    """``python -m hpc_serve.fleet.keeper --root R``: the keeper on this machine (``--router local``),
    as deployment ``local-<pid>``, on 127.0.0.1."""
    parser = argparse.ArgumentParser(prog="python -m hpc_serve.fleet.keeper")
    parser.add_argument("--root", required=True)
    args = parser.parse_args(argv)
    dep = Registry(args.root).deployment(f"local-{os.getpid()}")
    wait_until(lambda: os.path.exists(dep.file(JOB)), 30, poll_s=0.05)  # the submitter registers us
    if not dep.job:
        print(f"no registry entry {dep.path}", file=sys.stderr)
        return 2
    return Keeper(dep, "127.0.0.1", socket.gethostname()).run()


if __name__ == "__main__":
    sys.exit(main())
