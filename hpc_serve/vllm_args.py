"""The vLLM command line, built in one place from the layout, and checks on pass-through args."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from functools import lru_cache

from .errors import HpcServeError
from .layout import Layout
from .vllm_auth import MIDDLEWARE as AUTH_MIDDLEWARE

# vLLM flags hpc-serve sets from the layout, with their short aliases, and the option that owns them.
_MANAGED: dict[str, tuple[tuple[str, ...], str]] = {
    "--tensor-parallel-size": (("-tp",), "--tp"),
    "--pipeline-parallel-size": (("-pp",), "--pp"),
    "--data-parallel-size": (("-dp",), "--dp"),
    "--enable-expert-parallel": (("-ep",), "--ep"),
    "--distributed-executor-backend": ((), "--launcher"),
    "--data-parallel-backend": (("-dpb",), "--launcher"),
    "--data-parallel-size-local": (("-dpl",), "the layout"),
    "--data-parallel-address": (("-dpa",), "the layout"),
    "--data-parallel-rpc-port": (("-dpp",), "the layout"),
    "--data-parallel-start-rank": (("-dpr",), "the layout"),
    "--data-parallel-rank": (("-dpn",), "the layout"),
    "--nnodes": (("-n",), "--nodes"),
    "--node-rank": (("-r",), "the layout"),
    "--master-addr": ((), "the layout"),
    "--master-port": ((), "the layout"),
    "--headless": ((), "the layout"),
    "--host": ((), "the node agent"),
    "--port": ((), "--port"),
    "--model": ((), "MODEL"),
}
_ALIASES = {alias: flag for flag, (aliases, _) in _MANAGED.items() for alias in aliases}


@dataclass(frozen=True)
class Runtime:
    """Where a node runs: addresses, ports and temp dir. Placeholders when planning ahead."""

    node_ip: str = "<node-ip>"
    head_ip: str = "<head-ip>"
    api_port: str = "<api-port>"
    ray_port: str = "<ray-port>"
    master_port: str = "<master-port>"
    dp_rpc_port: str = "<dp-rpc-port>"
    ray_client_port: str = "<ray-client-port>"
    tmp_dir: str = "<job-tmp>"


@lru_cache(maxsize=8)
def _words(command: str) -> tuple[str, ...]:
    return tuple(shlex.split(command))


def _canonical(name: str) -> str:
    """vLLM accepts --foo_bar for --foo-bar and short aliases: map both to the long form."""
    if name.startswith("--"):
        name = "--" + name[2:].replace("_", "-")
    return _ALIASES.get(name, name)


def _split(args: tuple[str, ...]) -> list[tuple[str, str | None]]:
    """Pass-through args as (canonical flag, value) pairs; plain words get flag ''."""
    pairs: list[tuple[str, str | None]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("-") and len(arg) > 1 and not arg[1:2].isdigit():
            name, eq, value = arg.partition("=")
            name = _canonical(name)
            if not eq and i + 1 < len(args) and not args[i + 1].startswith("-"):
                value = args[i + 1]
                i += 1
            pairs.append((name, value if (eq or value) else None))
        else:
            pairs.append(("", arg))
        i += 1
    return pairs


def _layout_value(flag: str, layout: Layout) -> str | None:
    return {"--tensor-parallel-size": str(layout.tp), "--pipeline-parallel-size": str(layout.pp),
            "--data-parallel-size": str(layout.dp)}.get(flag)


def check_passthrough(args: tuple[str, ...], layout: Layout) -> tuple[str, ...]:
    """Refuse pass-through flags that contradict the layout or leak a secret; return warnings."""
    warnings: list[str] = []
    flags = {flag: value for flag, value in _split(args) if flag}
    for flag, value in flags.items():
        if flag == "--api-key":
            raise HpcServeError(
                "--api-key in the vLLM arguments would show the key to every user of the node (ps).",
                "Leave it out: hpc-serve gives vLLM a generated key through VLLM_API_KEY.",
            )
        if flag not in _MANAGED:
            continue
        owner = _MANAGED[flag][1]
        if flag == "--enable-expert-parallel" and layout.ep:
            continue
        if _layout_value(flag, layout) is not None and value == _layout_value(flag, layout):
            continue
        shown = f"{flag} {value}" if value is not None else flag
        raise HpcServeError(
            f"{shown} in the vLLM arguments contradicts the layout hpc-serve manages.",
            f"Set it with {owner} instead" + (f" (now tp={layout.tp}, pp={layout.pp}, dp={layout.dp})."
                                              if owner.startswith("--") else "; remove it."),
        )
    if "--enable-eplb" in flags and not layout.ep:
        raise HpcServeError("--enable-eplb needs expert parallelism; vLLM rejects it without.",
                            "Add --ep (for an MoE model), or drop --enable-eplb.")
    if "--all2all-backend" in flags and not layout.ep:
        warnings.append("--all2all-backend has no effect without --ep.")
    return tuple(warnings)


def served_model_name(model: str, args: tuple[str, ...]) -> str:
    """The name /v1/models will list: the first --served-model-name, else the model."""
    for flag, value in _split(args):
        if flag == "--served-model-name" and value:
            return value
    return model


def engine_argv(spec, rank: int, rt: Runtime) -> list[str] | None:  # spec: DeploymentSpec
    """The vLLM argv node ``rank`` runs, or None when that node runs no vLLM (Ray workers)."""
    lay: Layout = spec.layout
    if lay.launcher == "ray" and rank > 0:
        return None
    argv = list(_words(spec.engine_cmd))
    argv += [spec.model] if argv[-1] == "serve" else ["--model", spec.model]
    headless = lay.launcher == "mp" and rank > 0
    if not headless:
        argv += ["--host", rt.node_ip, "--port", rt.api_port]
        if spec.api_key:  # the key on every path, not only /v1 (hpc_serve/vllm_auth.py)
            argv += ["--middleware", AUTH_MIDDLEWARE]
    argv += ["--tensor-parallel-size", str(lay.tp), "--pipeline-parallel-size", str(lay.pp)]
    distributed = lay.tp * lay.pp > 1
    if lay.launcher == "ray":
        argv += ["--distributed-executor-backend", "ray"]
        if lay.dp > 1:
            argv += ["--data-parallel-size", str(lay.dp), "--data-parallel-backend", "ray",
                     "--data-parallel-address", rt.head_ip, "--data-parallel-rpc-port", rt.dp_rpc_port]
    else:
        if distributed:
            argv += ["--distributed-executor-backend", "mp"]
        if lay.dp > 1:
            argv += ["--data-parallel-size", str(lay.dp), "--data-parallel-backend", "mp",
                     "--data-parallel-size-local", str(lay.dp_local)]
            if lay.nodes > 1:
                argv += ["--data-parallel-address", rt.head_ip,
                         "--data-parallel-rpc-port", rt.dp_rpc_port]
            if headless:
                argv += ["--headless", "--data-parallel-start-rank", str(rank * lay.dp_local)]
        elif lay.nodes > 1:
            argv += ["--nnodes", str(lay.nodes), "--node-rank", str(rank),
                     "--master-addr", rt.head_ip, "--master-port", rt.master_port]
            if headless:
                argv += ["--headless"]
    user = spec.vllm_args
    if lay.ep:
        argv += ["--enable-expert-parallel"]
        if not any(flag == "--all2all-backend" for flag, _ in _split(user)):
            argv += ["--all2all-backend", spec.all2all_backend]
    argv += _without_agreeing(user, lay)
    return argv


def _without_agreeing(args: tuple[str, ...], layout: Layout) -> list[str]:
    """Drop pass-through flags that merely repeat the layout (check_passthrough allowed them)."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        name = _canonical(arg.partition("=")[0])
        if name in _MANAGED:
            has_inline = "=" in arg
            takes_value = name != "--enable-expert-parallel"
            i += 1 if (has_inline or not takes_value) else 2
            continue
        out.append(arg)
        i += 1
    return out
