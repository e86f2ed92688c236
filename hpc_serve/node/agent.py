"""The node agent: `python -m hpc_serve.node ...`, one task per node inside the allocation.

Stdlib only. One node's run is a small state machine over a context (hpc_serve.node.context):

    start -> gather (node 0) -> prepare -> preflight -> start Ray -> form Ray (node 0)
          -> start vLLM -> wait ready (node 0) -> publish (node 0) -> watch;  then always
          teardown, finish

Each step does one thing and returns the next step, or the run's exit code. Every node records
who it is; node 0 also writes the deployment's spec, plan and job records and waits until every
node has reported (hpc_serve.node.joining). prepare makes this node's runtime and computes its
plan, once; the preflight checks every node and the network between them, all nodes together,
before any engine starts (hpc_serve.node.preflight; --no-preflight skips it). With the mp
launcher every node runs its vLLM process; with Ray, node 0 writes the Ray token, starts the head
and waits until every node and GPU joined, the workers start as soon as the token exists
(hpc_serve.node.ray_cluster). Node 0 marks LOADING, then READY once /health answers and
/v1/models lists the model, and publishes the endpoint (hpc_serve.node.publish).
watch turns any node's vLLM exit or silence into FAILED with its reason (hpc_serve.node.outcome).

Restarts: a requeued job runs again under the same id with SLURM_RESTART_COUNT set; every record of
a run carries that count, so nothing of an earlier run is mistaken for this one. Node 0 requeues a
failed deployment itself while `--max-restarts` allows (RESTARTING). When a signal ends the run,
`hpc_serve.node.ending` decides why (cancel, time limit, requeue, or another node's agent vanishing)
at once, on a thread of its own; teardown waits for that end to be recorded before it stops any
engine (bounded, so that everything still ends within Slurm's KillWait).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Union

from ..errors import HpcServeError
from ..planner.launch import Process, make_plan, node_plan
from ..registry import API_KEY, JOB, LOGS, NODES, PLAN, RAY_TOKEN, SPEC, TERMINAL, create_json
from ..planner.spec import DeploymentSpec
from .args import node_spec
from .cleanup import clean_node, private_dir, shm_files, sweep_leftovers
from .context import NodeRun
from .ending import NOTE_WAIT_S, judge, note_signal
from .engine import EngineProcess
from .environment import auth_env
from .heartbeat import Heartbeat
from .joining import gres_mismatch, head_record, node_address, node_identity, wait_for_nodes
from .logs import exit_reason, tail
from .outcome import await_decision, end_failed, fail, failed_nodes, hand_over, record_verdict
from .publish import publish_endpoint, withdraw_and_record
from .readiness import serves, unguarded
from .runtime import busy_ports, make_runtime
from .stall import OutputWatch, node_logs, stall_reason

if TYPE_CHECKING:
    from .renew import Renewal

#: The signals that end a run (USR1 and USR2: the time limit is near; see hpc_serve.node.ending).
END_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
#: How long teardown waits for a signal's end to be recorded before it stops the engines anyway
#: (judging takes milliseconds, or NOTE_WAIT_S when an agent vanished), and how long in all.
VERDICT_FIRST_S, VERDICT_WAIT_S = NOTE_WAIT_S + 1.0, 15.0
#: How often the watch looks: node 0 before READY, node 0 once READY (it reads records), a follower.
POLL_LOADING_S, POLL_READY_S, POLL_FOLLOWER_S = 0.1, 1.0, 0.2

Step = Callable[[], Union["Step", int]]


class DeploymentFailed(RuntimeError):
    """Raised by the submitit task so that the task exits non-zero and Slurm ends the job."""


class Agent:
    """One node's run of a deployment, step by step (see the module's docstring)."""

    def __init__(self, run: NodeRun) -> None:
        self.run = run
        self.signalled = ""  # the name of the signal that ended the run
        self.judging: threading.Thread | None = None
        self.heartbeat: Heartbeat | None = None
        self.renewal: Renewal | None = None  # node 0 with --auto-renew
        self.shm_before: set[str] | None = None  # set once processes may start: teardown cleans
        self.ready = False

    def __call__(self) -> int:
        """Run every step until one returns the exit code; teardown and finish always follow."""
        for signum in END_SIGNALS:
            signal.signal(signum, self._on_signal)
        step: Step | int = self.start
        try:
            while not isinstance(step, int):
                step = step()
        finally:
            self.teardown()
        return self.finish(step)

    # --- the end a signal brings: decided at once, while everything still runs ----------------
    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.signalled:
            return
        run = self.run
        self.signalled = signal.Signals(signum).name
        run.stop.set()
        note_signal(run.dep, run.rank, run.restart, self.signalled)
        self.judging = threading.Thread(target=self._record_end, args=(self.signalled,), name="end")
        self.judging.start()

    def _record_end(self, signame: str) -> None:
        run = self.run
        verdict = judge(run.dep, run.job_id, run.rank, run.restart, signame, run.started)
        if verdict is not None:
            record_verdict(run, verdict)

    # --- the steps ------------------------------------------------------------------------------
    def start(self) -> Step | int:
        """Record this node (its address chosen), sweep what dead agents left, and on node 0 the
        deployment's records."""
        run = self.run
        run.mark("agent_start", at=run.started, fresh=True)
        if run.is_head and os.environ.get("HPC_SERVE_JOB_START"):
            run.mark("job_start", at=float(os.environ["HPC_SERVE_JOB_START"]))
        if run.is_head and run.restart:  # before node 0's record: the others trust the phase once it is there
            withdraw_and_record(run, "STARTING", f"restart {run.restart}: the job runs again on "
                                f"{socket.gethostname()}", restart=run.restart)
        try:
            ip, how = node_address(run)
        except HpcServeError as exc:
            ip, how, problem = "", "", f"{run.where}: {exc.problem} {exc.hint}"
        else:
            problem = ""
        run.identity = {**node_identity(run.rank, ip), "restart": run.restart}
        run.dep.write(run.dep.rank_file(NODES, run.rank), run.identity)
        sweep_leftovers(run.job_id, run.log)
        run.log(f"reported: {run.identity['hostname']} {ip} ({how}) GPUs={run.identity['cuda_visible_devices']}"
                + (f" (restart {run.restart})" if run.restart else ""))
        if run.is_head:
            self._record_deployment()
        if problem:
            return fail(run, problem)
        return self.gather if run.is_head else self.prepare

    def _record_deployment(self) -> None:
        """Node 0: spec, plan and job records, unless submission wrote them (then they stay)."""
        run = self.run
        dep, spec = run.dep, run.spec
        create_json(dep.file(SPEC), spec.to_dict())
        if not os.path.exists(dep.file(PLAN)):  # the placeholder plan of every node, as `plan` shows it
            create_json(dep.file(PLAN), make_plan(spec).to_dict())
        create_json(dep.file(JOB), {"job_id": run.job_id, "executor": run.executor,
                                    "name": os.environ.get("SLURM_JOB_NAME", spec.name),
                                    "submitted": time.time()})

    def gather(self) -> Step | int:
        """Node 0: wait until every node has reported."""
        missing = wait_for_nodes(self.run)
        if missing:
            return end_failed(self.run, f"nodes {missing} never reported within {self.run.join_timeout_s:.0f} s")
        self.run.mark("nodes_reported")
        return self.prepare

    def prepare(self) -> Step | int:
        """Beat; check the GPUs Slurm gave; make the runtime and this node's plan (once); make
        the temp folder and secrets; check that every port the plan binds is free."""
        run = self.run
        if run.stop.is_set():
            return 0
        self.heartbeat = Heartbeat(run.dep, run.rank, run.stop).start()
        mismatch = gres_mismatch(run)
        if mismatch:
            return fail(run, mismatch)
        head = head_record(run)
        if head is None:
            run.log("node 0 never reported; ending")
            return 1
        rt = run.runtime = make_runtime(run.job_id, run.identity["ip"], head["ip"], run.spec.port)
        run.plan = node_plan(run.spec, run.rank, rt)
        try:
            private_dir(rt.tmp_dir)
        except (RuntimeError, OSError) as exc:
            return fail(run, f"{run.where}: {exc}")
        if run.spec.layout.launcher == "ray" and run.is_head:
            run.dep.create_secret(RAY_TOKEN)
        if run.spec.api_key and run.is_head:
            run.api_key = run.dep.create_secret(API_KEY)
        busy = busy_ports(rt.node_ip, [int(port) for port in run.plan.ports])  # exactly what this node binds
        if busy:
            return fail(run, f"port(s) {busy} already in use on {run.where}: pass a free --port, or resubmit")
        self.shm_before = shm_files()
        if run.is_head and run.spec.auto_renew and run.job_id.isdigit():
            from .renew import Renewal

            self.renewal = Renewal(run.dep, run.job_id, run.spec.renew_before, run.log)
        return self.preflight if run.spec.preflight else self.start_ray

    def preflight(self) -> Step | int:
        """Every node checks itself, then the nodes check the network between them, together;
        node 0 ends the run with every problem found, before anything loads."""
        from .preflight import Preflight

        run = self.run
        if run.is_head:
            run.dep.set_phase("STARTING", f"preflight on {run.spec.layout.nodes} node(s)")
        check = Preflight(run)
        reason = check()
        if run.stop.is_set():
            return 0
        if reason:
            if run.is_head:
                return end_failed(run, reason)
            run.log(reason)
            return 1  # node 0 reads the same records and ends the run; finish waits for that
        run.log(f"preflight passed: {check.summary()}")
        if run.is_head:
            run.mark("preflight_done")
        return self.start_ray

    def start_ray(self) -> Step | int:
        """Ray's head (node 0) or a worker (once node 0 wrote the token), where the plan has Ray."""
        from .ray_cluster import wait_for_ray_token

        run = self.run
        if self._planned("ray") is None:
            return self.start_vllm
        if not run.is_head and not wait_for_ray_token(run):
            return 0 if run.stop.is_set() or run.dep.phase in TERMINAL else \
                fail(run, f"{run.where}: node 0 never started Ray within {run.join_timeout_s:.0f} s")
        code = self._launch("ray")
        if code is not None:
            return code
        return self.form_ray if run.is_head else self.start_vllm

    def form_ray(self) -> Step | int:
        """Node 0: wait until every node and GPU joined Ray."""
        from .ray_cluster import form_ray

        reason = form_ray(self.run, self.run.engines[-1])
        return fail(self.run, reason) if reason else self.start_vllm

    def start_vllm(self) -> Step | int:
        """This node's vLLM process, where the plan has one; node 0 then marks LOADING."""
        run = self.run
        if self._planned("vllm") is not None:
            code = self._launch("vllm")
            if code is not None:
                return code
        if not run.is_head:
            return self.watch
        if not run.stop.is_set():
            run.dep.set_phase("LOADING", f"vLLM starting on {run.spec.layout.nodes} node(s)")
        return self.wait_ready

    def wait_ready(self) -> Step | int:
        """Node 0: watch until vLLM serves (alive, /health 200, /v1/models lists the model); a
        start-up with no new engine output on any node for --stall-timeout s fails."""
        run = self.run
        output = OutputWatch(node_logs(run.dep.file(LOGS)), run.spec.stall_timeout)
        while not run.stop.is_set():
            code = self._check()
            if code is not None:
                return code
            if serves(run.url, run.served_model, run.auth_headers):
                return self.publish
            silent = output.silent_s()
            if silent is not None:
                last = tail(run.dep.log_path(run.rank), 1)
                return fail(run, stall_reason(silent, run.spec.stall_timeout, run.where, last))
            run.stop.wait(POLL_LOADING_S)
        return 0

    def publish(self) -> Step | int:
        """Node 0: refuse a server that answers without the key; else READY and the endpoint."""
        run = self.run
        open_door = unguarded(run.url, run.spec.open_metrics) if run.api_key else None
        if open_door:
            return fail(run, f"vLLM on {run.where} answers without the key ({open_door}): the "
                             "hpc_serve_auth middleware did not load; the endpoint is not published")
        self.ready = True
        run.mark("ready")
        publish_endpoint(run)
        if self.renewal is not None:
            self.renewal.start()
        return self.watch

    def watch(self) -> Step | int:
        """Until a signal: any failure ends the run; node 0 hands over to a successor once READY."""
        run = self.run
        poll_s = POLL_READY_S if run.is_head else POLL_FOLLOWER_S
        while not run.stop.is_set():
            code = self._check()
            if code is not None:
                return code
            if self.ready and self.renewal is not None:
                successor = self.renewal.step()
                if successor is not None:
                    return hand_over(run, successor)
            run.stop.wait(poll_s)
        return 0

    # --- always, after the steps ----------------------------------------------------------------
    def teardown(self) -> None:
        """Once processes could start: the end recorded first, then stop them, clean the node."""
        run = self.run
        if self.shm_before is None or run.runtime is None:
            return
        if self.judging is not None:  # a signal's end is recorded before any engine stops
            self.judging.join(VERDICT_FIRST_S)
        if run.engines:
            run.log("stopping " + ", ".join(e.process.name for e in reversed(run.engines)))
        for engine in reversed(run.engines):  # Ray holds no state: 1 s, so all ends within KillWait
            engine.stop(grace_s=1.0 if engine.process.name == "ray" else 3.0)
        clean_node(run.runtime.tmp_dir, self.shm_before)
        if run.engines:
            run.log("stopped; temp files removed")

    def finish(self, code: int) -> int:
        """Settle the end: a failed follower waits for node 0's decision, the signal's end is
        recorded, and node 0 ends the run for a follower's failure it has not acted on yet."""
        run = self.run
        if not run.is_head and code and not run.stop.is_set():
            await_decision(run)
        if run.stop.is_set():
            run.log(f"received {self.signalled or 'stop'}: ending")
        if self.judging is not None:
            self.judging.join(VERDICT_WAIT_S)
        if run.is_head and not run.stop.is_set() and run.dep.phase not in (*TERMINAL, "RESTARTING"):
            failed = failed_nodes(run)
            if failed:
                code = end_failed(run, failed[0])
        return code

    # --- helpers of the steps -------------------------------------------------------------------
    def _planned(self, name: str) -> Process | None:
        assert self.run.plan is not None
        return next((p for p in self.run.plan.processes if p.name == name), None)

    def _launch(self, name: str) -> int | None:
        """Start planned process ``name`` with the run's additions to its environment (Ray's
        token; vLLM's key, never in its argv). An exit code when it could not start."""
        from .ray_cluster import deployment_ray_env

        run, planned = self.run, self._planned(name)
        assert planned is not None and run.runtime is not None
        env = planned.env + (deployment_ray_env(run) if run.spec.layout.launcher == "ray" else ())
        if name == "vllm" and run.api_key:
            env += auth_env(run.spec, run.api_key, run.runtime.tmp_dir)
        engine = EngineProcess(Process(name, planned.argv, env), run.dep.log_path(run.rank),
                               run.runtime.tmp_dir, f"{run.job_id}/{run.rank}")
        try:
            engine.start(run.spec.cache_dir)
        except RuntimeError as exc:
            return fail(run, f"{run.where}: {exc}")
        run.engines.append(engine)
        run.log(f"started {name} (pid {engine.popen.pid}): {' '.join(planned.argv)}")
        run.mark(f"{name}_started")
        return None

    def _check(self) -> int | None:
        """One look for a failure: an engine that exited, a silent node, a follower's report."""
        run = self.run
        for engine in run.engines:
            if engine.exit_code is not None and not run.stop.is_set():  # not a signalled end
                return fail(run, exit_reason(engine.process.name, run.where, engine.exit_code,
                                             run.dep.log_path(run.rank)))
        assert self.heartbeat is not None
        quiet = self.heartbeat.silent(range(1, run.spec.layout.nodes) if run.is_head else [0])
        if quiet:
            reason = self.heartbeat.reason(quiet[0], run.records().get(quiet[0], {}).get("hostname", "?"))
            if not run.is_head:  # node 0 cannot record its own end any more: this node does
                run.dep.set_phase("FAILED", reason)
            return fail(run, reason)
        if run.is_head:
            failed = failed_nodes(run)
            if failed:
                return end_failed(run, failed[0])
        return None


def run(spec: DeploymentSpec, rank: int, job_id: str, executor: str) -> int:
    """Everything one node does for deployment ``job_id``; returns the exit code."""
    return Agent(NodeRun.open(spec, rank, job_id, executor))()


def _rank_and_job() -> tuple[int, str, str]:
    env = os.environ
    if "SLURM_JOB_ID" in env:
        return int(env.get("SLURM_NODEID", "0")), env["SLURM_JOB_ID"], "sbatch"
    return 0, f"local-{os.getpid()}", "local"


def run_task(model: str, node_args: list[str], home: str, local_gpus: str | None = None) -> int:
    """The function submitit runs on every task (one per node). ``local_gpus``: with
    ``--executor local``, the devices of the whole job; each rank takes its own share."""
    import submitit

    job_env = submitit.JobEnvironment()
    spec = node_spec(["--model", model, *node_args], home)
    executor = "local" if job_env.cluster == "local" else "slurm"
    if executor == "local" and local_gpus is not None:
        per_node = spec.layout.gpus_per_node
        mine = local_gpus.split(",")[job_env.global_rank * per_node:(job_env.global_rank + 1) * per_node]
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
    job_id = str(job_env.job_id) if executor == "slurm" else f"local-{job_env.job_id}"
    code = run(spec, job_env.global_rank, job_id, executor)
    if code:  # a non-zero task exit is what makes srun --kill-on-bad-exit end the other nodes
        raise DeploymentFailed(f"deployment {job_id} failed on node {job_env.global_rank}: "
                               f"see hpc-serve status {job_id}")
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m hpc_serve.node` (the sbatch templates' srun line)."""
    try:
        spec = node_spec(sys.argv[1:] if argv is None else argv)
        rank, job_id, executor = _rank_and_job()
        return run(spec, rank, job_id, executor)
    except HpcServeError as exc:
        exc.report("hpc-serve node")
        return exc.exit_code
