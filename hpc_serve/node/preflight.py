"""The preflight: every node checks itself and the network between the nodes before any engine
starts, so that a bad node or a blocked port ends the job in seconds, before weights load.

All nodes go through the same stages together, each stage recorded in ``preflight/<rank>.json``:

    listening   this node's own checks are done (hpc_serve.node.checks) and it listens on the
                ports its plan binds and the preflight's port (multi-node only, from here on)
    reached     it tried every port of every other node (hpc_serve.node.fabric)
    done        its listeners are closed and, when every node reached every other, the all-reduce
                ran (every node at once)

Each node waits until every node has recorded a stage before the next one, so no node connects
to one that is not listening yet, and no engine binds a port another node still probes. Then
every node reads the same records: node 0 ends the run with all the problems found, the others
wait for that. Stdlib only.
"""

from __future__ import annotations

import os
import time
from typing import Any

from ..registry import PREFLIGHT
from .checks import node_checks
from .context import NodeRun
from .environment import cache_env, command_python
from .fabric import Listeners, all_reduce, infiniband_devices, unreached

STAGES = ("listening", "reached", "done")
#: At most this many problems are named in the failure reason (all are in the records).
MAX_NAMED = 4


class Preflight:
    """This node's preflight (see the module's docstring)."""

    def __init__(self, run: NodeRun) -> None:
        self.run = run
        self.record: dict[str, Any] = {"restart": run.restart, "rank": run.rank, "stage": ""}
        self.began = time.monotonic()

    def __call__(self) -> str | None:
        """Run every stage; the failure reason (this node's and the others' problems), or None."""
        run = self.run
        assert run.runtime is not None and run.plan is not None
        problems, figures = node_checks(run.spec, run.where, run.runtime.tmp_dir,
                                        cache_env(run.spec.cache_dir, os.environ)["VLLM_CACHE_ROOT"], os.environ)
        self.record.update(problems=problems, figures=figures)
        if not run.multi_host:
            self._write("done")
            return self.verdict({run.rank: self.record})
        # its plan's ports, and the all-reduce's (on node 0 its rendezvous; elsewhere it stands for
        # the ports torch.distributed picks between every pair of nodes)
        ports = [int(port) for port in run.plan.ports] + [int(run.runtime.preflight_port)]
        listeners = Listeners(run.runtime.node_ip, ports)
        try:
            self.record.update(ip=run.runtime.node_ip, ports=listeners.ports)
            if listeners.refused:
                problems.append(f"port(s) {listeners.refused} already in use on {run.where}: resubmit")
            self._write("listening")
            records = self._wait("listening")
            if isinstance(records, str):
                return records
            peers = {rank: record for rank, record in records.items() if rank != run.rank}
            self.record["unreached"] = unreached(peers)
            self._write("reached")
            records = self._wait("reached")
            if isinstance(records, str):
                return records
        finally:
            listeners.close()
        if not any(record.get("unreached") or record.get("problems") for record in records.values()):
            self.record["all_reduce"] = self._all_reduce()
        self._write("done")
        records = self._wait("done")
        return records if isinstance(records, str) else self.verdict(records)

    def summary(self) -> str:
        """This node's preflight in a few words, for its log."""
        return describe(self.record)

    def _all_reduce(self) -> dict[str, Any]:
        run = self.run
        assert run.runtime is not None
        result = all_reduce(command_python(run.spec.engine_cmd), run.runtime.head_ip, int(run.runtime.preflight_port),
                            run.rank, run.spec.layout.nodes, dict(run.spec.env), stop=run.stop)
        transport, devices = (result.get("nccl") or {}).get("transport"), infiniband_devices()
        if transport and transport.lower().startswith("socket") and devices:
            result["warning"] = (f"NCCL chose sockets between the nodes although {run.where} has InfiniBand "
                                 f"({', '.join(devices)}): check NCCL_IB_DISABLE, NCCL_NET and the IB drivers")
            run.log(f"warning: {result['warning']}")
        return result

    def _write(self, stage: str) -> None:
        run = self.run
        self.record.update(stage=stage, took_s=round(time.monotonic() - self.began, 3))
        self.record["summary"] = describe(self.record)
        run.dep.write(run.dep.rank_file(PREFLIGHT, run.rank), self.record)

    def _wait(self, stage: str) -> dict[int, dict] | str:
        """Every node's record once all have reached ``stage``; or why not (who never did)."""
        run, want = self.run, STAGES.index(stage)
        count = run.spec.layout.nodes
        deadline = time.monotonic() + run.join_timeout_s
        while True:
            records = preflight_records(run)
            behind = [rank for rank in range(count)
                      if STAGES.index(records.get(rank, {}).get("stage") or STAGES[0]) < want or rank not in records]
            if not behind:
                return records
            if run.stop.is_set():
                return "stopped during the preflight"
            if time.monotonic() > deadline:
                return (f"the preflight did not finish: node(s) {behind} never got past "
                        f"'{stage}' within {run.join_timeout_s:.0f} s")
            run.stop.wait(0.05)

    def verdict(self, records: dict[int, dict]) -> str | None:
        """What failed anywhere, in one reason (None: every check passed)."""
        return verdict(records, _names(self.run))


def _names(run: NodeRun) -> dict[int, str]:
    """"node RANK (HOSTNAME)" for every node of this run."""
    return {rank: f"node {rank} ({record.get('hostname', '?')})" for rank, record in run.records().items()}


def preflight_records(run: NodeRun) -> dict[int, dict]:
    """The preflight records of this run, by rank."""
    return {rank: record for rank, record in run.dep.rank_records(PREFLIGHT).items()
            if record.get("restart", 0) == run.restart}


def describe(record: dict[str, Any]) -> str:
    """One node's preflight record in a few words: how long, what it reached, the all-reduce."""
    words = [f"{record.get('took_s', 0):.2f} s"]
    if "unreached" in record:
        words.append("reached every other node" if not record["unreached"] else
                     f"{len(record['unreached'])} port(s) of other nodes unreachable")
    result = record.get("all_reduce") or {}
    for backend in ("gloo", "nccl"):
        if backend in result:
            figures = result[backend]
            words.append(f"{backend} all-reduce of {figures['mib']} MiB in {figures['seconds'] * 1000:.1f} ms "
                         f"({figures['bus_gbps']} GB/s bus bandwidth" +
                         (f", over {figures['transport']})" if figures.get("transport") else ")"))
    if result.get("skipped"):
        words.append(f"all-reduce skipped: {result['skipped']}")
    return ", ".join(words)


def verdict(records: dict[int, dict], names: dict[int, str]) -> str | None:
    """Every problem of every node's record, in one reason (None: every check passed)."""
    def name(rank: int) -> str:
        return names.get(rank, f"node {rank}")

    problems = [p for rank in sorted(records) for p in records[rank].get("problems", ())]
    for rank in sorted(records):
        for miss in records[rank].get("unreached", ()):
            problems.append(f"{name(rank)} cannot reach {name(miss['to'])} at {miss['ip']}:{miss['port']}: "
                            f"{miss['error']}")
        error = (records[rank].get("all_reduce") or {}).get("error")
        if error:
            problems.append(f"{name(rank)}: {error}")
    if not problems:
        return None
    more = f" (and {len(problems) - MAX_NAMED} more in `hpc-serve status`)" if len(problems) > MAX_NAMED else ""
    hint = ("; check the firewall between the nodes, or name the network they share (--network)"
            if any(record.get("unreached") for record in records.values()) else "")
    return "preflight failed: " + "; ".join(problems[:MAX_NAMED]) + more + hint
