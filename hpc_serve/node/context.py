"""One node's run of a deployment, as one object: who it is, where it runs, what it runs.

Every step of the agent (hpc_serve.node.agent) and every helper it calls takes this context
instead of a list of parameters: the spec and rank, the job id and executor, the registry entry
and the node log, the restart count, the stop event that a signal sets, this node's record, its
runtime and plan (computed once, by the agent's prepare step), the API key and the engine
processes it started. Stdlib only.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..planner.launch import NodePlan
from ..planner.spec import DeploymentSpec
from ..planner.vllm_args import Runtime, served_model_name
from ..registry import TIMINGS, Deployment, Registry, registry_root
from .engine import EngineProcess
from .logs import NodeLog

#: How long any node waits for another one (its record, Ray's head, Ray joining) before failing.
JOIN_TIMEOUT_S = float(os.environ.get("HPC_SERVE_JOIN_TIMEOUT", "120"))


@dataclass
class NodeRun:
    """Everything one node holds for one run of deployment ``job_id``."""

    spec: DeploymentSpec
    rank: int
    job_id: str
    executor: str
    dep: Deployment
    log: NodeLog
    restart: int = 0
    started: float = field(default_factory=time.time)
    stop: threading.Event = field(default_factory=threading.Event)
    join_timeout_s: float = JOIN_TIMEOUT_S
    identity: dict[str, Any] = field(default_factory=dict)
    runtime: Runtime | None = None
    plan: NodePlan | None = None
    api_key: str = ""
    engines: list[EngineProcess] = field(default_factory=list)

    @classmethod
    def open(cls, spec: DeploymentSpec, rank: int, job_id: str, executor: str) -> "NodeRun":
        """The run Slurm (or the local executor) started now: its registry entry made sure of,
        the restart count from ``SLURM_RESTART_COUNT``."""
        dep = Registry(registry_root(spec.home)).deployment(job_id).ensure()
        return cls(spec, rank, job_id, executor, dep, NodeLog(dep.log_path(rank), rank),
                   restart=int(os.environ.get("SLURM_RESTART_COUNT") or 0))

    @property
    def is_head(self) -> bool:
        """Node 0: it owns the deployment's records, the API server and Ray's head."""
        return self.rank == 0

    @property
    def where(self) -> str:
        """"node RANK (HOSTNAME)", as failure reasons name a node."""
        return f"node {self.rank} ({self.identity.get('hostname') or socket.gethostname()})"

    @property
    def multi_host(self) -> bool:
        """Whether the nodes are different machines (they must reach each other's address)."""
        return self.spec.layout.nodes > 1 and self.executor != "local"

    def records(self) -> dict[int, dict]:
        """The node records of this run, by rank."""
        return self.dep.nodes(self.restart)

    def mark(self, event: str, at: float | None = None, fresh: bool = False) -> None:
        """Record when ``event`` happened on this node in this run (``fresh``: the run's first)."""
        path = self.dep.rank_file(TIMINGS, self.rank)
        os.makedirs(self.dep.file(TIMINGS), mode=0o700, exist_ok=True)
        before = {} if fresh else self.dep.read(path, {}) or {}
        self.dep.write(path, {**before, event: time.time() if at is None else at})

    @property
    def url(self) -> str:
        """The API server's base URL (node 0's address and API port); needs the runtime."""
        assert self.runtime is not None
        return f"http://{self.runtime.node_ip}:{self.runtime.api_port}"

    @property
    def served_model(self) -> str:
        """The model name the API lists."""
        return served_model_name(self.spec.model, self.spec.vllm_args)

    @property
    def auth_headers(self) -> dict[str, str]:
        """What a request to our own endpoint sends (the key, when there is one)."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
