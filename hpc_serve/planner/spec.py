"""DeploymentSpec: everything a deployment needs, validated once and frozen.

Its fields, and ``build_spec``'s keywords, are the options of planner/options.py (a unit test
holds them to that table); the per-option checks come from the table, the checks that span
options (layout, MoE, renewal, pass-through vLLM flags) are here and in planner/layout.py.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from ..errors import HpcServeError
from .layout import Layout, resolve_layout
from .model_info import check_moe, hub_snapshot, is_hub_id, weight_files
from .options import BY_NAME, DEFAULT_ALL2ALL, OPTIONS, check_network, parse_env, parse_time

__all__ = ["DeploymentSpec", "build_spec", "check_network", "parse_env", "parse_time", "spec_from_options"]


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
    stall_timeout: int = 1200
    preflight: bool = True
    auto_renew: bool = False
    renew_before: int = 30
    network: str | None = None
    cache_dir: str | None = None
    hf_home: str | None = None
    offline: bool = False
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

    def options(self) -> dict[str, Any]:
        """The options (build_spec's keywords) that make this very spec again. A layout value
        that was derived is left to its default, so that it is derived again, with the same note."""
        derived = {note.split("=", 1)[0] for note in self.layout.notes}
        out: dict[str, Any] = {}
        for option in OPTIONS:
            if option.in_spec:
                value = getattr(self.layout if option.in_layout else self, option.name)
                out[option.name] = option.default if option.name in derived else \
                    list(value) if option.kind == "list" else value
        out["env"] = [f"{key}={value}" for key, value in self.env]
        return out


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
    gpu_memory: int | None = None,
    ssh_cmd: str = "ssh",
    api_key: bool = True,
    max_restarts: int = 0,
    stall_timeout: int = 1200,
    preflight: bool = True,
    auto_renew: bool = False,
    renew_before: int = 30,
    network: str | None = None,
    cache_dir: str | None = None,
    hf_home: str | None = None,
    offline: bool = False,
    open_metrics: bool = False,
    replicas: int | None = None,
    router: str = "slurm",
    router_policy: str = "round_robin",
    router_partition: str | None = None,
    router_cmd: str = "vllm-router",
) -> DeploymentSpec:
    """Validate every input and resolve the layout; raise HpcServeError naming the fix."""
    return spec_from_options(dict(locals()))


def spec_from_options(options: Mapping[str, Any], *, on_node: bool = False) -> DeploymentSpec:
    """build_spec from a mapping of options (missing ones take their default). ``on_node``: the
    node agent rebuilds the spec; checks of the login side's files (the container image) are skipped."""
    unknown = sorted(set(options) - set(BY_NAME))
    if unknown:
        raise HpcServeError(f"Unknown option {unknown[0]!r}.", f"Valid options: {', '.join(sorted(BY_NAME))}.")
    values = {option.name: options.get(option.name, option.default) for option in OPTIONS}
    model = values["model"]
    if model is None or not str(model).strip():
        raise HpcServeError(
            "No model given.",
            "Name one: hpc-serve submit MODEL, --model MODEL, or 'model = ...' in your config profile.",
        )
    if values["gpus_per_node"] is None:
        raise HpcServeError("No GPUs per node given.", "Give --gpus-per-node, or gpus_per_node in your config.")
    layout = resolve_layout(**{option.name: values[option.name] for option in OPTIONS if option.in_layout})
    for option in OPTIONS:
        if not option.in_layout and option.name != "model" and (option.checked_on_node or not on_node):
            option.validate(values[option.name])
    return _cross_checked(values, str(model).strip(), layout, on_node)


def _check_renewal(time: str | None, renew_before: int) -> None:
    if time is None:
        raise HpcServeError("--auto-renew needs a time limit to renew before.",
                            "Give --time, e.g. --time 24:00:00 --auto-renew.")
    if not 1 <= renew_before < parse_time(time):
        raise HpcServeError(
            f"--renew-before {renew_before} must be at least 1 minute and less than --time {time}.",
            "Give the minutes a successor needs to queue and load, e.g. --renew-before 30.")


def _hub_env(values: dict[str, Any], env: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """``env`` plus HF_HOME and HF_HUB_CACHE (``hf_home``; an inherited HF_HUB_CACHE would win over
    HF_HOME) and HF_HUB_OFFLINE=1 (``offline``), each unless --env set it."""
    given = {key for key, _ in env}
    extra = []
    if values["hf_home"]:
        extra += [(key, value) for key, value in (("HF_HOME", values["hf_home"]),
                                                  ("HF_HUB_CACHE", os.path.join(values["hf_home"], "hub")))
                  if key not in given]
    if values["offline"] and "HF_HUB_OFFLINE" not in given:
        extra.append(("HF_HUB_OFFLINE", "1"))
    return env + tuple(extra)


def _check_fetched(model: str, env: tuple[tuple[str, str], ...], vllm_args: tuple[str, ...]) -> None:
    """With offline nodes, a hub model must already be in the cache the job reads, weights too,
    at the revision vLLM will ask for (``--revision``; offline it resolves ``main`` otherwise)."""
    from .vllm_parser import passed_value

    if not is_hub_id(model) or dict(env).get("HF_HUB_OFFLINE", "1") in ("", "0"):
        return
    hub_vars = {key: os.path.expanduser(value) for key, value in {**os.environ, **dict(env)}.items()
                if key in ("HF_HOME", "HF_HUB_CACHE")}
    where = hub_vars.get("HF_HUB_CACHE") or hub_vars.get("HF_HOME") or "~/.cache/huggingface"
    revision = passed_value(list(vllm_args), "revision") or "main"
    folder = hub_snapshot(model, hub_vars, revision)
    complete = folder is not None and bool(weight_files(folder))
    if not complete:
        hf_home = hub_vars.get("HF_HOME") or where
        half = f" (its snapshot {folder} has no weights: an interrupted fetch?)" if folder else ""
        at = "" if revision == "main" else f" at revision {revision}"
        fetch = f"hpc-serve fetch {model} --hf-home {hf_home}" + ("" if revision == "main" else
                                                                 f" --revision {revision}")
        raise HpcServeError(
            f"{model}{at} is not in the Hugging Face cache at {where}{half}, and the nodes are offline (--offline).",
            f"Fetch it first, where the hub is reachable: {fetch}")


def _cross_checked(values: dict[str, Any], model: str, layout: Layout, on_node: bool = False) -> DeploymentSpec:
    """The checks that span options, then the spec."""
    from .vllm_args import check_passthrough  # local: one-way imports

    if values["hf_home"]:
        values = {**values, "hf_home": os.path.abspath(os.path.expanduser(values["hf_home"]))}
    env = _hub_env(values, parse_env(values["env"]))
    if values["offline"] and not on_node:
        _check_fetched(model, env, tuple(values["vllm_args"]))

    if layout.ep:
        check_moe(model)
    if values["auto_renew"]:
        _check_renewal(values["time"], values["renew_before"])
    vllm_args = tuple(values["vllm_args"])
    warnings = layout.warnings + check_passthrough(vllm_args, layout)
    if not values["api_key"]:
        warnings += ("--no-api-key: anyone who can reach the node's address can use this endpoint.",)
    fields = {option.name: values[option.name] for option in OPTIONS if option.in_spec and not option.in_layout}
    fields.update(model=model, env=env, setup=tuple(values["setup"]), vllm_args=vllm_args)
    return DeploymentSpec(layout=layout, warnings=warnings, **fields)
