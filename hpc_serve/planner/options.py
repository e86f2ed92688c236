"""Every deployment option, once: its kind, default, flag, help, config key and check.

An option's ``name`` is its config key (``partition = "gpu"``), its ``HPC_SERVE_<NAME>`` variable,
its keyword in ``build_spec`` and ``hpc_serve.plan/render/resolve/submit``, and its field in
DeploymentSpec (or in its Layout). Generated from :data:`OPTIONS`: the settings' defaults and kinds
(planner/settings.py), the flags of `hpc-serve submit/render/plan` (cli/parser.py), the node
agent's argv and its parser (node/args.py), and the per-option half of the spec's validation.
What spans several options (the layout, ``--auto-renew`` with ``--time``, pass-through vLLM flags
against the layout) is checked in planner/spec.py and planner/layout.py.

Pure, stdlib only, and light: the CLI imports it to build its parser.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import HpcServeError
from .layout import LAUNCHERS

KINDS = ("str", "int", "bool", "list")
EXECUTORS = ("slurm", "local")
DEFAULT_ALL2ALL = "allgather_reducescatter"
MAX_RESTARTS = 100
#: The option whose values go to vLLM after ``--`` (on the CLI and in the node agent's argv).
PASSTHROUGH = "vllm_args"
#: The integer options that may also be "auto" (the layout from the model: planner/sizing.py).
AUTO = "auto"
AUTO_OPTIONS = ("tp",)
_TIME = re.compile(r"^(\d+-\d{1,2}(:\d{1,2}(:\d{1,2})?)?|\d+(:\d{1,2}(:\d{1,2})?)?)$")
_MEM = re.compile(r"^\d+[KMGT]?$", re.IGNORECASE)
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SECRET_KEY = re.compile(r"TOKEN|SECRET|PASSWORD|API_KEY|_KEY$", re.IGNORECASE)
_DIRECTIVE = re.compile(r"^[^\s'\"\\`$;]+$")


@dataclass(frozen=True)
class Option:
    """One deployment option. ``group`` is its help group on the CLI (None: no flag, config and
    environment only); ``check`` refuses a bad value with an HpcServeError naming the fix."""

    name: str
    kind: str
    default: Any
    help: str = ""
    group: str | None = None
    aliases: tuple[str, ...] = ()
    choices: tuple[str, ...] = ()
    check: Callable[[Any], None] | None = None
    in_spec: bool = True  # a field of DeploymentSpec (False: read by the client side only)
    in_layout: bool = False  # a field of DeploymentSpec.layout
    to_node: bool = True  # written into the node agent's argv
    checked_on_node: bool = True  # False: its check reads the login side's files, which a node may not see
    env_lines: bool = False  # HPC_SERVE_<NAME> holds one item per line (else shell words)

    @property
    def flag(self) -> str:
        """``--name`` with dashes; ``--no-name`` for a switch that is on by default."""
        dashed = self.name.replace("_", "-")
        return f"--no-{dashed}" if self.kind == "bool" and self.default else f"--{dashed}"

    def validate(self, value: Any) -> None:
        """Refuse a bad value; ``None`` is "not set" for an option without a default."""
        if value is None and self.default is None:
            return
        if self.choices and value not in self.choices:
            raise HpcServeError(f"Unknown {self.name} {value!r}.", f"Use one of: {', '.join(self.choices)}.")
        if self.check is not None:
            self.check(value)


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
    hint = "Give an interface name (--network ib0) or a CIDR (--network 10.1.0.0/16)."
    if "/" in network:
        import ipaddress

        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise HpcServeError(f"--network {network!r} is not a CIDR.", hint) from None
    elif not network or len(network) > 15 or not all(ch.isalnum() or ch in "._-:" for ch in network):
        raise HpcServeError(f"--network {network!r} is not an interface name.", hint)


def _directive(option: str, what: str = "") -> Callable[[str], None]:
    """A check that ``--option`` fits on an ``#SBATCH`` line (``what``: the Slurm value it names)."""
    def check(value: str) -> None:
        if not _DIRECTIVE.match(value):
            raise HpcServeError(
                f"--{option} {value!r} has spaces, quotes or shell characters, which an #SBATCH line cannot hold.",
                f"Give a plain Slurm {what or option + ' name'}.",
            )
    return check


def _command(option: str, default: str, what: str) -> Callable[[str], None]:
    """A check that ``--option`` names a command."""
    def check(value: str | None) -> None:
        import shlex

        if not shlex.split(value or ""):
            raise HpcServeError(f"--{option} is empty.", f"Leave it out for '{default}', or name {what}.")
    return check


def _check_port(port: int) -> None:
    if not 1024 <= port <= 65535:
        raise HpcServeError(
            f"--port {port} is outside 1024-65535.",
            "Pick an unprivileged port, or leave --port out to get one derived from the job id.",
        )


def _check_mem(mem: str) -> None:
    if not _MEM.match(mem):
        raise HpcServeError(f"--mem {mem!r} is not a Slurm memory size.", "Use e.g. --mem 256G, or --mem 0 for all.")


def _check_gpu_memory(gib: int) -> None:
    if gib < 1:
        raise HpcServeError(f"--gpu-memory must be at least 1 GiB (got {gib}).",
                            "Give the memory of one GPU in GiB, e.g. --gpu-memory 80.")


def _check_cpus(cpus: int) -> None:
    if cpus < 1:
        raise HpcServeError(f"--cpus-per-node must be at least 1 (got {cpus}).",
                            "Give a positive number of CPUs, or leave it out.")


def _check_max_restarts(count: int) -> None:
    if not 0 <= count <= MAX_RESTARTS:
        raise HpcServeError(f"--max-restarts must be between 0 and {MAX_RESTARTS} (got {count}).",
                            "Give how many times a failed deployment may be requeued, e.g. --max-restarts 2.")


def _check_stall_timeout(seconds: int) -> None:
    if seconds < 0:
        raise HpcServeError(f"--stall-timeout must be 0 (never) or a number of seconds (got {seconds}).",
                            "Give how long a start-up may go without new engine output, e.g. --stall-timeout 1800.")


def _check_setup(lines: list[str] | tuple[str, ...]) -> None:
    if any("\n" in line for line in lines):
        raise HpcServeError("A --setup line contains a newline.", "Give one --setup per line.")


def _check_container(image: str) -> None:
    looks_like_file = image.startswith(("/", "./", "../", "~")) or image.endswith((".sif", ".sqsh"))
    if looks_like_file and not os.path.isfile(os.path.expanduser(image)):
        raise HpcServeError(
            f"Container image {image!r} does not exist.",
            "Give the path of an Apptainer .sif or Enroot .sqsh file, or a registry image "
            "such as docker://vllm/vllm-openai:latest.",
        )


def _check_all2all(value: str) -> None:
    from .vllm_args import check_all2all_backend  # vLLM's choices; not needed to build the CLI

    check_all2all_backend(value)


def _check_replicas(count: int) -> None:
    if not 1 <= count <= MAX_REPLICAS:
        raise HpcServeError(f"--replicas must be between 1 and {MAX_REPLICAS} (got {count}).",
                            "Give how many copies of the deployment serve behind one router, e.g. --replicas 2.")


_LAYOUT, _RESOURCES, _SETUP, _FLEET = "layout", "resources", "node setup", "fleet"
ROUTERS = ("slurm", "local")
#: vllm-router's policies that start with no worker (its power_of_two refuses to: "requires at
#: least 2 workers"), as the keeper starts it before any replica is READY.
ROUTER_POLICIES = ("cache_aware", "round_robin", "random", "consistent_hash")
MAX_REPLICAS = 64

#: Every option, in the order of the CLI's help (and of the node agent's argv).
OPTIONS: tuple[Option, ...] = (
    Option("model", "str", None, "model name or path (or the MODEL argument)", _LAYOUT, to_node=False),
    Option("nodes", "int", None, "nodes to allocate (derived when missing)", _LAYOUT, in_layout=True),
    Option("gpus_per_node", "int", None, "GPUs per node (flag > profile > sinfo > 8)", _LAYOUT, in_layout=True),
    Option("tp", "int", None, "tensor-parallel size, inside a node (default: a whole node; auto: the "
           "smallest that holds the model, with PP across nodes when needed; needs --gpu-memory)", _LAYOUT,
           in_layout=True),
    Option("pp", "int", None, "pipeline-parallel size, across nodes (default 1)", _LAYOUT, in_layout=True),
    Option("dp", "int", None, "data-parallel replicas (derived when missing)", _LAYOUT, in_layout=True),
    Option("ep", "bool", False, "expert parallelism for MoE models (ep = dp*tp)", _LAYOUT, in_layout=True),
    Option("launcher", "str", "auto", "ray, mp, or auto (default: Ray across nodes, mp on one)", _LAYOUT,
           choices=LAUNCHERS, in_layout=True),
    Option("cross_node_tp", "bool", False, "allow TP across nodes (slow; warns)", _LAYOUT, in_layout=True),
    Option("all2all_backend", "str", DEFAULT_ALL2ALL,
           "MoE all2all backend with --ep (default allgather_reducescatter)", _LAYOUT, check=_check_all2all),
    Option("partition", "str", None, "Slurm partition", _RESOURCES, ("-p",), check=_directive("partition")),
    Option("account", "str", None, "Slurm account", _RESOURCES, ("-A",), check=_directive("account")),
    Option("qos", "str", None, "Slurm QOS", _RESOURCES, check=_directive("qos")),
    Option("time", "str", None, "time limit, e.g. 04:00:00 or 1-00:00:00", _RESOURCES, ("-t",),
           check=parse_time),
    Option("constraint", "str", None, "Slurm node features, e.g. a100", _RESOURCES, ("-C",),
           check=_directive("constraint")),
    Option("exclusive", "bool", False, "whole nodes only", _RESOURCES),
    Option("cpus_per_node", "int", None, "CPUs per node", _RESOURCES, check=_check_cpus),
    Option("gpu_memory", "int", None, "GiB of memory of one GPU, for --tp auto (e.g. 80)", _RESOURCES,
           check=_check_gpu_memory, in_spec=False, to_node=False),
    Option("mem", "str", None, "memory per node, e.g. 256G (0 = all)", _RESOURCES, check=_check_mem),
    Option("name", "str", "hpc-serve", "job name (default hpc-serve)", _RESOURCES,
           check=_directive("name", "job name")),
    Option("setup", "list", (), "shell line run before the agent (repeatable), e.g. 'module load cuda'",
           _SETUP, check=_check_setup, env_lines=True),
    Option("env", "list", (), "KEY=VALUE for the job (repeatable; never secrets)", _SETUP, check=parse_env),
    Option("container", "str", None, "Apptainer .sif file, or Enroot/Pyxis image", _SETUP,
           check=_check_container, checked_on_node=False),
    Option("engine_cmd", "str", "vllm serve", "engine command (default 'vllm serve')", _SETUP,
           check=_command("engine-cmd", "vllm serve", "a command")),
    Option("ray_cmd", "str", "ray", "Ray's command for the Ray launcher (default 'ray')", _SETUP,
           check=_command("ray-cmd", "ray", "the ray command")),
    Option("port", "int", None, "API port (default: derived from the job id)", _SETUP, check=_check_port),
    Option("network", "str", None, "the nodes' network for vLLM, Ray, Gloo and NCCL: an interface (ib0) "
           "or a CIDR (10.1.0.0/16); default: the route to node 0", _SETUP, check=check_network),
    Option("cache_dir", "str", None, "vLLM's compile cache, shared by deployments "
           "(default: $VLLM_CACHE_ROOT, else ~/.cache/vllm)", _SETUP),
    Option("hf_home", "str", None, "the Hugging Face cache every node reads: the job's HF_HOME, where "
           "`hpc-serve fetch` downloads (default: HF_HOME as the job inherits it)", _SETUP),
    Option("offline", "bool", False, "the compute nodes cannot reach the Hugging Face hub: the job gets "
           "HF_HUB_OFFLINE=1 and a hub model must be fetched first (hpc-serve fetch)", _SETUP),
    Option("api_key", "bool", True, "serve without the generated API key (warns)", _SETUP),
    Option("open_metrics", "bool", False, "let /metrics answer without the key (for a site's Prometheus)",
           _SETUP),
    Option("max_restarts", "int", 0, "requeue a failed deployment up to N times (default 0)", _SETUP,
           check=_check_max_restarts),
    Option("stall_timeout", "int", 1200, "fail a start-up whose engines print nothing for this many "
           "seconds (default 1200; 0: never)", _SETUP, check=_check_stall_timeout),
    Option("preflight", "bool", True, "skip the checks of every node and of the network between them "
           "before the engine starts", _SETUP),
    Option("auto_renew", "bool", False, "before the time limit, start a successor job that takes over "
           "once READY", _SETUP),
    Option("renew_before", "int", 30, "minutes before the limit to submit it (default 30)", _SETUP),
    Option("executor", "str", "slurm", "slurm (default) or local", _SETUP, choices=EXECUTORS),
    Option("replicas", "int", None, "serve N copies, each its own Slurm job, behind one router and one "
           "URL (docs/fleet.md)", _FLEET, check=_check_replicas, in_spec=False, to_node=False),
    Option("router", "str", "slurm", "where the router runs: slurm (its own small job, default) or local "
           "(this machine)", _FLEET, choices=ROUTERS, in_spec=False, to_node=False),
    Option("router_policy", "str", "round_robin", "vllm-router's policy (default round_robin)", _FLEET,
           choices=ROUTER_POLICIES, in_spec=False, to_node=False),
    Option("router_partition", "str", None, "partition of the router's job (default: --partition)", _FLEET,
           check=_directive("router-partition", "partition name"), in_spec=False, to_node=False),
    Option("router_cmd", "str", "vllm-router", "vllm-router's command (default 'vllm-router')", _FLEET,
           check=_command("router-cmd", "vllm-router", "a command"), in_spec=False, to_node=False),
    Option(PASSTHROUGH, "list", (), "arguments for vLLM (after --)"),
    Option("home", "str", "~/.hpc-serve", "the deployment registry"),
    Option("python", "str", "python3", "the interpreter that runs the node agent"),
    Option("login_host", "str", None, "the login host `tunnel` goes through", in_spec=False, to_node=False),
    Option("ssh_cmd", "str", "ssh", "the command `tunnel` runs", in_spec=False, to_node=False),
)
BY_NAME: dict[str, Option] = {option.name: option for option in OPTIONS}
#: Config key -> kind, for the settings' type checks.
SETTING_KINDS: dict[str, str] = {option.name: option.kind for option in OPTIONS}
#: The options the node agent's argv carries (the model comes as --model "$MODEL").
NODE_OPTIONS: tuple[Option, ...] = tuple(option for option in OPTIONS if option.to_node)


def defaults() -> dict[str, Any]:
    """Every option's built-in default (lists as fresh lists), in the table's order."""
    return {o.name: list(o.default) if o.kind == "list" else o.default for o in OPTIONS}


def option_words(option: Option, value: Any) -> list[str]:
    """``value`` of ``option`` as flag words (none for its default); ``--flag=value`` where the
    value starts with a dash, so that no parser reads it as a flag."""
    if option.kind == "bool":
        return [option.flag] if bool(value) != option.default else []
    items = list(value) if option.kind == "list" else [] if value in (None, option.default) else [value]
    words: list[str] = []
    for item in map(str, items):
        words += [f"{option.flag}={item}"] if item.startswith("-") else [option.flag, item]
    return words
