"""A group from the login side: submit it, scale it, show it, cancel it.

A group is N replicas (each a whole deployment, its own Slurm job) and a router entry in the
registry (``job.json`` ``kind: router``) that the keeper (fleet/keeper.py) runs under. The router's
entry carries the group's name, so ``endpoint``, ``tunnel``, ``smoke``, ``bench``, ``logs`` and
``wait`` work on the name as on a deployment; replicas are named ``NAME-1``, ``NAME-2``, ...

Every job is submitted held and released only once its registry entry is complete (the group's
key in it, the router's id): no agent ever starts without them. A refusal part way cancels what
was already submitted, so a failed ``submit --replicas`` leaves nothing queued.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from typing import Any

from ..errors import HpcServeError
from ..registry import API_KEY, JOB, ROUTER, SPEC, TERMINAL, Deployment, Registry, registry_root
from ..planner.spec import DeploymentSpec
from .members import slot_chain


def is_router(dep: Deployment) -> bool:
    """Whether ``dep`` is a group's router entry."""
    try:
        return dep.job.get("kind") == ROUTER
    except HpcServeError:
        return False


def router_command(command: str) -> str:
    """``command`` as the keeper will run it: a bare name not on PATH but installed beside this
    Python (pip install 'hpc-serve[fleet]' into a venv that is not activated) by its full path."""
    words = shlex.split(command)
    beside = os.path.join(os.path.dirname(sys.executable), words[0])
    if shutil.which(words[0]) is None and os.sep not in words[0] and os.access(beside, os.X_OK):
        return shlex.join([beside, *words[1:]])
    return command


FLEET_OPTIONS = ("replicas", "router", "router_policy", "router_partition", "router_cmd")


def fleet_options(values: dict[str, Any]) -> dict[str, Any]:
    """The group's options (``--replicas``, ``--router``, ...) out of the resolved option values."""
    return {name: values.get(name) for name in FLEET_OPTIONS}


def _check(spec: DeploymentSpec, fleet: dict[str, Any]) -> None:
    if spec.executor == "local":
        raise HpcServeError("--replicas needs Slurm: each replica is its own Slurm job.",
                            "Leave --executor local out, or serve one deployment without --replicas.")
    if spec.auto_renew and fleet["router"] == "slurm":
        raise HpcServeError("--auto-renew keeps the replicas past --time, but the router's Slurm job ends at "
                            "--time (it is not renewed).", "Add --router local (the router on this machine), "
                            "or leave --auto-renew out.")
    command = shlex.split(fleet["router_cmd"])[0]
    if fleet["router"] == "local" and shutil.which(command) is None:
        raise HpcServeError(f"The router's command {command!r} is not on PATH (--router local runs it here).",
                            "pip install 'hpc-serve[fleet]' (vllm-router), or give --router-cmd.")


def _start_local_keeper(root: str) -> tuple[str, int]:
    """The keeper as a detached process of this machine; its id is ``local-<pid>``."""
    child = subprocess.Popen([sys.executable, "-m", "hpc_serve.fleet.keeper", "--root", root],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    return f"local-{child.pid}", child.pid


def _register_router(registry: Registry, router_id: str, spec: DeploymentSpec, fleet: dict[str, Any],
                     key: str, slurm_id: str, executor: str) -> Deployment:
    dep = registry.deployment(router_id).ensure()
    dep.write(SPEC, spec.to_dict())
    if key:
        dep.write_secret(API_KEY, key)
    dep.write(JOB, {"kind": ROUTER, "job_id": router_id, "slurm_job_id": slurm_id, "executor": executor,
                    "name": spec.name, "submitted": time.time(), "slots": [], "router_cmd": fleet["router_cmd"],
                    "policy": fleet["router_policy"], "options": spec.options()})
    dep.init_phase("PENDING", "submitted")
    return dep


def _add_replica(router: Deployment, spec: DeploymentSpec, index: int, key: str) -> Deployment:
    """Submit replica ``index`` held, give it the group's key and router, release it."""
    from ..job.submission import submit
    from ..slurm import release

    replica = submit(dataclasses.replace(spec, name=f"{spec.name}-{index}"), hold=True)
    try:
        if key:
            replica.write_secret(API_KEY, key)
        replica.write(JOB, {**replica.job, "router": router.id, "group": spec.name, "replica": index})
        router.write(JOB, {**router.job, "slots": [*router.job.get("slots", []), replica.id]})
    finally:
        release(replica.slurm_job_id)
    return replica


def submit_group(spec: DeploymentSpec, fleet: dict[str, Any]) -> Deployment:
    """Submit ``fleet["replicas"]`` replicas of ``spec`` and their router; return the router's
    entry (READY once the router serves through one replica at least)."""
    from ..client.control import live_group_named, stop_job
    from ..job.submission import submit_router
    from ..slurm import release

    fleet = {**fleet, "router_cmd": router_command(fleet["router_cmd"])}
    _check(spec, fleet)
    registry = Registry(registry_root(spec.home))
    registry.check_writable()
    if live_group_named(registry, spec.name):
        raise HpcServeError(f"A live group is already named {spec.name!r}.",
                            f"Give another --name, or scale it: hpc-serve scale {spec.name} N.")
    key = secrets.token_hex(32) if spec.api_key else ""
    if fleet["router"] == "local":
        router_id, pid = _start_local_keeper(registry.root)
        router = _register_router(registry, router_id, spec, fleet, key, str(pid), "local")
    else:
        slurm_id = submit_router(spec, fleet.get("router_partition"), spec.time_minutes)
        router = _register_router(registry, slurm_id, spec, fleet, key, slurm_id, "slurm")
    added: list[Deployment] = []
    try:
        for index in range(1, fleet["replicas"] + 1):
            added.append(_add_replica(router, spec, index, key))
    except BaseException:
        for dep in [*added, router]:
            stop_job(dep)
            dep.set_phase("STOPPED", "cancelled: the group's submission failed")
        raise
    if router.job.get("executor") == "slurm":
        release(router.slurm_job_id)
    return router


def replicas(router: Deployment) -> list[Deployment]:
    """Every deployment of the group's slots, oldest first (renewals included)."""
    registry = Registry(router.root)
    return [dep for slot in router.job.get("slots", []) for dep in slot_chain(registry, slot)]


def members(router: Deployment) -> list[dict]:
    """Who the keeper last put in the router: url, id and the requests sent to each."""
    from ..registry import MEMBERS, CorruptRecord

    try:
        return list((router.read(MEMBERS, {}) or {}).get("members", []))
    except CorruptRecord:
        return []


def scale(router: Deployment, count: int) -> tuple[list[str], list[str]]:
    """Make the group ``count`` replicas: submit more, or cancel the newest; (added, cancelled) ids."""
    from ..client.control import cancel
    from ..planner.options import MAX_REPLICAS
    from ..planner.spec import spec_from_options

    if not 1 <= count <= MAX_REPLICAS:
        raise HpcServeError(f"A group has 1 to {MAX_REPLICAS} replicas (asked for {count}).",
                            "Give the number of replicas to serve, e.g. hpc-serve scale NAME 3.")
    if router.phase in TERMINAL:
        raise HpcServeError(f"Group {router.job.get('name')} has ended ({router.phase}).",
                            "Submit a new one: hpc-serve submit MODEL --replicas N.")
    registry = Registry(router.root)
    live = [slot for slot in router.job.get("slots", []) if slot_chain(registry, slot)[-1].phase not in TERMINAL]
    added, cancelled = [], []
    if count > len(live):
        spec = spec_from_options(router.job["options"])
        numbers = [registry.deployment(slot).job.get("replica", 0) for slot in router.job.get("slots", [])]
        first = max(numbers, default=0) + 1
        for index in range(first, first + count - len(live)):
            added.append(_add_replica(router, spec, index, router.api_key).id)
    for slot in reversed(live[count:]):
        cancelled.append(cancel(slot_chain(registry, slot)[-1].id, router.root).id)
    return added, cancelled


def cancel_group(router: Deployment, timeout_s: float = 30.0) -> list[str]:
    """End the router, then every live replica; the ids that were cancelled."""
    from ..client.control import cancel, status

    return [cancel(dep.id, router.root, timeout_s).id for dep in [router, *replicas(router)]
            if status(dep.id, router.root, live=False).live]
