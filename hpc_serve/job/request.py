"""The one Slurm request of a deployment, which both submission paths send.

`hpc-serve render` writes it as ``#SBATCH`` lines and an ``srun`` line (templates/), `hpc-serve
submit` hands the same values to submitit: what is asked of Slurm (resources, the time-limit
signal, ``--requeue``, ``--kill-on-bad-exit``) is decided here once. Pure; no Slurm call.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..planner.spec import DeploymentSpec

#: Seconds between the time-limit signal and the kill: the agent stops vLLM and Ray in that time.
SIGNAL_BEFORE_END_S = 120


@dataclass(frozen=True)
class SlurmRequest:
    """What one deployment asks of Slurm; ``None`` leaves a value to the cluster's default."""

    job_name: str
    nodes: int
    gpus_per_node: int
    cpus_per_task: int | None
    mem: str | None
    time: str | None
    time_minutes: int | None
    partition: str | None
    account: str | None
    qos: str | None
    constraint: str | None
    exclusive: bool
    requeue: bool = True  # preemption and --max-restarts requeue the job
    signal_before_end_s: int = SIGNAL_BEFORE_END_S
    hold: bool = False  # submitted held: registered first, then released (a group's jobs)

    def directives(self) -> list[str]:
        """The ``#SBATCH`` options, in the order the script shows them (no ``--output``)."""
        out = [f"--job-name={self.job_name}", f"--nodes={self.nodes}", "--ntasks-per-node=1",
               f"--gpus-per-node={self.gpus_per_node}"]
        for flag, value in (("cpus-per-task", self.cpus_per_task), ("mem", self.mem), ("time", self.time),
                            ("partition", self.partition), ("account", self.account), ("qos", self.qos),
                            ("constraint", self.constraint)):
            if value:
                out.append(f"--{flag}={value}")
        if self.exclusive:
            out.append("--exclusive")
        out.append(f"--signal=B:USR1@{self.signal_before_end_s}")  # to the batch shell, which srun forwards
        if self.requeue:
            out.append("--requeue")
        return out

    def srun_args(self) -> list[str]:
        """Options of the step that runs one node agent per node (after the task counts)."""
        # srun does not inherit sbatch's --cpus-per-task (Slurm >= 22.05): the step gets its CPUs
        return ["--kill-on-bad-exit=1"] + ([f"--cpus-per-task={self.cpus_per_task}"] if self.cpus_per_task else [])

    def submitit_parameters(self) -> dict:
        """The same request as submitit's SlurmExecutor parameters (submitit signals with USR2)."""
        return {
            "job_name": self.job_name, "nodes": self.nodes, "ntasks_per_node": 1,
            "gpus_per_node": self.gpus_per_node or None, "partition": self.partition, "account": self.account,
            "qos": self.qos, "constraint": self.constraint, "cpus_per_task": self.cpus_per_task,
            "mem": self.mem, "time": self.time_minutes, "exclusive": self.exclusive or None,
            "signal_delay_s": self.signal_before_end_s, "wckey": None, "srun_args": self.srun_args(),
            "additional_parameters": {**({"requeue": True} if self.requeue else {}),
                                      **({"hold": True} if self.hold else {})},
        }


#: What a group's router job asks for: vllm-router and the key front need little.
ROUTER_CPUS, ROUTER_MEM = 2, "2G"


def router_request(spec: DeploymentSpec, partition: str | None, time_minutes: int | None) -> SlurmRequest:
    """The Slurm request of a group's router (hpc_serve.fleet): one node, no GPU, held."""
    time = None if time_minutes is None else f"{time_minutes}"
    return SlurmRequest(
        job_name=f"{spec.name}-router", nodes=1, gpus_per_node=0, cpus_per_task=ROUTER_CPUS, mem=ROUTER_MEM,
        time=time, time_minutes=time_minutes, partition=partition or spec.partition, account=spec.account,
        qos=spec.qos, constraint=None, exclusive=False, requeue=False, signal_before_end_s=60, hold=True)


def slurm_request(spec: DeploymentSpec, hold: bool = False) -> SlurmRequest:
    """The Slurm request of ``spec`` (its values were checked when the spec was built)."""
    return SlurmRequest(
        job_name=spec.name, nodes=spec.layout.nodes, gpus_per_node=spec.layout.gpus_per_node,
        cpus_per_task=spec.cpus_per_node, mem=spec.memory, time=spec.time, time_minutes=spec.time_minutes,
        partition=spec.partition, account=spec.account, qos=spec.qos, constraint=spec.constraint,
        exclusive=spec.exclusive, hold=hold,
    )
