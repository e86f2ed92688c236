"""DeploymentSpec: everything a deployment needs, validated once and frozen."""

from __future__ import annotations

import os
import ipaddress
import re
import shlex
from dataclasses import asdict, dataclass, field

from ..errors import HpcServeError
from .layout import Layout, resolve_layout
from .model_info import check_moe

#: Keys a config file, HPC_SERVE_* variable or flag may set, with their kind.
SETTING_KINDS: dict[str, str] = {
    "model": "str", "nodes": "int", "gpus_per_node": "int", "tp": "int", "pp": "int",
    "dp": "int", "ep": "bool", "launcher": "str", "cross_node_tp": "bool",
    "all2all_backend": "str", "partition": "str", "account": "str", "qos": "str",
    "time": "str", "constraint": "str", "exclusive": "bool", "cpus_per_node": "int",
    "mem": "str", "name": "str", "env": "list", "setup": "list", "container": "str",
    "engine_cmd": "str", "ray_cmd": "str", "vllm_args": "list", "port": "int", "executor": "str",
    "home": "str", "python": "str", "login_host": "str", "ssh_cmd": "str",
    "api_key": "bool", "max_restarts": "int", "auto_renew": "bool", "renew_before": "int",
    "network": "str", "cache_dir": "str", "open_metrics": "bool",
}
EXECUTORS = ("slurm", "local")
DEFAULT_ALL2ALL = "allgather_reducescatter"
MAX_RESTARTS = 100
_TIME = re.compile(r"^(\d+-\d{1,2}(:\d{1,2}(:\d{1,2})?)?|\d+(:\d{1,2}(:\d{1,2})?)?)$")
_MEM = re.compile(r"^\d+[KMGT]?$", re.IGNORECASE)
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SECRET_KEY = re.compile(r"TOKEN|SECRET|PASSWORD|API_KEY|_KEY$", re.IGNORECASE)
_DIRECTIVE = re.compile(r"^[^\s'\"\\`$;]+$")


@dataclass(frozen=True)
class DeploymentSpec:
    """A validated deployment request. Build it with :func:`build_spec`."""

    model: str
    layout: Layout
    all2all_backend: str = DEFAULT_ALL2ALL
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    constraint: str | None = None
    exclusive: bool = False
    cpus_per_node: int | None = None
    mem: str | None = None
    name: str = "hpc-serve"
    env: tuple[tuple[str, str], ...] = ()
    setup: tuple[str, ...] = ()
    container: str | None = None
    engine_cmd: str = "vllm serve"
    ray_cmd: str = "ray"
    vllm_args: tuple[str, ...] = ()
    port: int | None = None
    executor: str = "slurm"
    home: str = "~/.hpc-serve"
    python: str = "python3"
    api_key: bool = True
    max_restarts: int = 0
    auto_renew: bool = False
    renew_before: int = 30
    network: str | None = None
    cache_dir: str | None = None
    open_metrics: bool = False
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def memory(self) -> str | None:
        """Memory per node to ask for: ``mem``, else all of the node's (0) for an exclusive job."""
        return self.mem if self.mem is not None else "0" if self.exclusive else None

    def resources_text(self) -> str:
        """What the job asks Slurm for on each node, in words (`hpc-serve plan`)."""
        cpus = f"{self.cpus_per_node} CPUs (also given to each node's step)" if self.cpus_per_node \
            else "the partition's default CPUs"
        mem = {None: "the partition's default memory", "0": "all its memory"}.get(self.memory, self.memory)
        return (f"per node: {self.layout.gpus_per_node} GPUs, {cpus}, {mem}"
                + ("; whole nodes (--exclusive)" if self.exclusive else ""))

    @property
    def time_minutes(self) -> int | None:
        """The time limit in whole minutes (what submitit takes), or None."""
        return parse_time(self.time) if self.time else None

    def to_dict(self) -> dict:
        """A JSON-ready dict (the registry stores it)."""
        data = asdict(self)
        data["layout"] = asdict(self.layout)
        return data

    def to_json(self) -> str:
        import json

        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def parse_time(value: str) -> int:
    """Slurm's time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) to minutes, rounded up."""
    if not _TIME.match(value):
        raise HpcServeError(
            f"--time {value!r} is not a Slurm time limit.",
            "Use minutes, HH:MM:SS or D-HH:MM:SS, e.g. --time 04:00:00 or --time 1-00:00:00.",
        )
    days, _, rest = value.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:  # D-H, D-H:M, D-H:M:S
        parts += [0] * (3 - len(parts))
        hours, minutes, seconds = parts
        hours += int(days) * 24
    elif len(parts) == 3:
        hours, minutes, seconds = parts
    else:  # M or M:S
        hours, minutes, seconds = 0, parts[0], parts[1] if len(parts) == 2 else 0
    total = hours * 60 + minutes + (1 if seconds else 0)
    if total < 1:
        raise HpcServeError(f"--time {value!r} is zero.", "Give at least one minute, e.g. --time 30.")
    return total


def parse_env(items: list[str] | tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """``KEY=VALUE`` strings to pairs; refuses malformed items and secrets."""
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not _ENV_KEY.match(key):
            raise HpcServeError(
                f"--env {item!r} is not KEY=VALUE.",
                "Write it as --env NAME=value, e.g. --env VLLM_LOGGING_LEVEL=DEBUG.",
            )
        if _SECRET_KEY.search(key):
            raise HpcServeError(
                f"--env {key}=... looks like a secret, and --env values are written into the job script.",
                f"Export {key} in your shell before submitting instead: the job inherits it at run time.",
            )
        pairs.append((key, value))
    return tuple(pairs)


def check_network(network: str | None) -> None:
    """Refuse a ``network`` setting that is neither an interface name nor a CIDR."""
    if network is None:
        return
    if "/" in network:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise HpcServeError(f"--network {network!r} is not a CIDR.",
                                "Give an interface name (--network ib0) or a CIDR (--network 10.1.0.0/16).") from None
    elif not network or len(network) > 15 or not all(ch.isalnum() or ch in "._-:" for ch in network):
        raise HpcServeError(f"--network {network!r} is not an interface name.",
                            "Give an interface name (--network ib0) or a CIDR (--network 10.1.0.0/16).")


def _check_directive(option: str, value: str | None) -> None:
    if value is not None and not _DIRECTIVE.match(value):
        raise HpcServeError(
            f"--{option} {value!r} has spaces, quotes or shell characters, which an #SBATCH line cannot hold.",
            f"Give a plain Slurm {option} name.",
        )


def _check_renewal(time: str | None, renew_before: int) -> None:
    if time is None:
        raise HpcServeError("--auto-renew needs a time limit to renew before.",
                            "Give --time, e.g. --time 24:00:00 --auto-renew.")
    if not 1 <= renew_before < parse_time(time):
        raise HpcServeError(
            f"--renew-before {renew_before} must be at least 1 minute and less than --time {time}.",
            "Give the minutes a successor needs to queue and load, e.g. --renew-before 30.")


def _check_container(image: str | None) -> None:
    if image is None:
        return
    looks_like_file = image.startswith(("/", "./", "../", "~")) or image.endswith((".sif", ".sqsh"))
    if looks_like_file and not os.path.isfile(os.path.expanduser(image)):
        raise HpcServeError(
            f"Container image {image!r} does not exist.",
            "Give the path of an Apptainer .sif or Enroot .sqsh file, or a registry image "
            "such as docker://vllm/vllm-openai:latest.",
        )


def build_spec(
    *,
    model: str | None,
    gpus_per_node: int,
    nodes: int | None = None,
    tp: int | None = None,
    pp: int | None = None,
    dp: int | None = None,
    ep: bool = False,
    launcher: str = "auto",
    cross_node_tp: bool = False,
    all2all_backend: str = DEFAULT_ALL2ALL,
    partition: str | None = None,
    account: str | None = None,
    qos: str | None = None,
    time: str | None = None,
    constraint: str | None = None,
    exclusive: bool = False,
    cpus_per_node: int | None = None,
    mem: str | None = None,
    name: str = "hpc-serve",
    env: list[str] | tuple[str, ...] = (),
    setup: list[str] | tuple[str, ...] = (),
    container: str | None = None,
    engine_cmd: str = "vllm serve",
    ray_cmd: str = "ray",
    vllm_args: list[str] | tuple[str, ...] = (),
    port: int | None = None,
    executor: str = "slurm",
    home: str = "~/.hpc-serve",
    python: str = "python3",
    login_host: str | None = None,
    ssh_cmd: str = "ssh",
    api_key: bool = True,
    max_restarts: int = 0,
    auto_renew: bool = False,
    renew_before: int = 30,
    network: str | None = None,
    cache_dir: str | None = None,
    open_metrics: bool = False,
) -> DeploymentSpec:
    """Validate every input and resolve the layout; raise HpcServeError naming the fix."""
    from .vllm_args import check_all2all_backend, check_passthrough  # local: one-way imports

    del login_host, ssh_cmd  # client-side settings (tunnel); accepted so that one settings dict fits
    if model is None or not str(model).strip():
        raise HpcServeError(
            "No model given.",
            "Name one: hpc-serve submit MODEL, --model MODEL, or 'model = ...' in your config profile.",
        )
    model = str(model).strip()
    layout = resolve_layout(
        gpus_per_node=gpus_per_node, nodes=nodes, tp=tp, pp=pp, dp=dp, ep=ep,
        launcher=launcher, cross_node_tp=cross_node_tp,
    )
    if ep:
        check_moe(model)
    if time is not None:
        parse_time(time)
    if port is not None and not 1024 <= port <= 65535:
        raise HpcServeError(
            f"--port {port} is outside 1024-65535.",
            "Pick an unprivileged port, or leave --port out to get one derived from the job id.",
        )
    if mem is not None and not _MEM.match(mem):
        raise HpcServeError(
            f"--mem {mem!r} is not a Slurm memory size.", "Use e.g. --mem 256G, or --mem 0 for all."
        )
    if cpus_per_node is not None and cpus_per_node < 1:
        raise HpcServeError(f"--cpus-per-node must be at least 1 (got {cpus_per_node}).",
                            "Give a positive number of CPUs, or leave it out.")
    if not 0 <= max_restarts <= MAX_RESTARTS:
        raise HpcServeError(f"--max-restarts must be between 0 and {MAX_RESTARTS} (got {max_restarts}).",
                            "Give how many times a failed deployment may be requeued, e.g. --max-restarts 2.")
    if auto_renew:
        _check_renewal(time, renew_before)
    if executor not in EXECUTORS:
        raise HpcServeError(f"Unknown executor {executor!r}.", f"Use one of: {', '.join(EXECUTORS)}.")
    for option, value in (("partition", partition), ("account", account), ("qos", qos),
                          ("constraint", constraint), ("name", name)):
        _check_directive(option, value)
    _check_container(container)
    check_network(network)
    if not shlex.split(engine_cmd or ""):
        raise HpcServeError("--engine-cmd is empty.", "Leave it out for 'vllm serve', or name a command.")
    if not shlex.split(ray_cmd or ""):
        raise HpcServeError("--ray-cmd is empty.", "Leave it out for 'ray', or name the ray command.")
    if any("\n" in line for line in setup):
        raise HpcServeError("A --setup line contains a newline.", "Give one --setup per line.")
    vllm_args = tuple(vllm_args)
    warnings = check_passthrough(vllm_args, layout)
    check_all2all_backend(all2all_backend)
    if not api_key:
        warnings += ("--no-api-key: anyone who can reach the node's address can use this endpoint.",)
    return DeploymentSpec(
        model=model, layout=layout, all2all_backend=all2all_backend, partition=partition,
        account=account, qos=qos, time=time, constraint=constraint, exclusive=exclusive,
        cpus_per_node=cpus_per_node, mem=mem, name=name, env=parse_env(env), setup=tuple(setup),
        container=container, engine_cmd=engine_cmd, ray_cmd=ray_cmd, vllm_args=vllm_args, port=port,
        executor=executor, home=home, python=python, api_key=api_key, max_restarts=max_restarts,
        auto_renew=auto_renew, renew_before=renew_before, network=network, cache_dir=cache_dir,
        open_metrics=open_metrics,
        warnings=layout.warnings + warnings,
    )
