"""The `hpc-serve` command: thin argparse adapters over the Python API.

One place (``main``) turns HpcServeError into a short message and exit code 2; ``--debug``
(or HPC_SERVE_DEBUG=1) shows the traceback instead. Everything after ``--`` goes to vLLM.
argparse keeps start-up fast: `--help` and `render` stay well under 0.2 s.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ..version import __version__
from ..errors import HpcServeError


# (flags, dest, kind, help) for every spec option shared by submit, render and plan.
_SPEC_OPTIONS: dict[str, list[tuple[tuple[str, ...], str, str, str]]] = {
    "layout": [
        (("--model",), "model_opt", "str", "model name or path (or the MODEL argument)"),
        (("--nodes",), "nodes", "int", "nodes to allocate (derived when missing)"),
        (("--gpus-per-node",), "gpus_per_node", "int", "GPUs per node (flag > profile > sinfo > 8)"),
        (("--tp",), "tp", "int", "tensor-parallel size, inside a node (default: a whole node)"),
        (("--pp",), "pp", "int", "pipeline-parallel size, across nodes (default 1)"),
        (("--dp",), "dp", "int", "data-parallel replicas (derived when missing)"),
        (("--ep",), "ep", "bool", "expert parallelism for MoE models (ep = dp*tp)"),
        (("--launcher",), "launcher", "str", "ray, mp, or auto (default: Ray across nodes, mp on one)"),
        (("--cross-node-tp",), "cross_node_tp", "bool", "allow TP across nodes (slow; warns)"),
        (("--all2all-backend",), "all2all_backend", "str", "MoE all2all backend with --ep "
         "(default allgather_reducescatter)"),
    ],
    "resources": [
        (("--partition", "-p"), "partition", "str", "Slurm partition"),
        (("--account", "-A"), "account", "str", "Slurm account"),
        (("--qos",), "qos", "str", "Slurm QOS"),
        (("--time", "-t"), "time", "str", "time limit, e.g. 04:00:00 or 1-00:00:00"),
        (("--constraint", "-C"), "constraint", "str", "Slurm node features, e.g. a100"),
        (("--exclusive",), "exclusive", "bool", "whole nodes only"),
        (("--cpus-per-node",), "cpus_per_node", "int", "CPUs per node"),
        (("--mem",), "mem", "str", "memory per node, e.g. 256G (0 = all)"),
        (("--name",), "name", "str", "job name (default hpc-serve)"),
    ],
    "node setup": [
        (("--setup",), "setup", "list", "shell line run before the agent (repeatable), "
         "e.g. 'module load cuda'"),
        (("--env",), "env", "list", "KEY=VALUE for the job (repeatable; never secrets)"),
        (("--container",), "container", "str", "Apptainer .sif file, or Enroot/Pyxis image"),
        (("--engine-cmd",), "engine_cmd", "str", "engine command (default 'vllm serve')"),
        (("--ray-cmd",), "ray_cmd", "str", "Ray's command for the Ray launcher (default 'ray')"),
        (("--port",), "port", "int", "API port (default: derived from the job id)"),
        (("--network",), "network", "str", "the nodes' network for vLLM, Ray, Gloo and NCCL: an "
         "interface (ib0) or a CIDR (10.1.0.0/16); default: the route to node 0"),
        (("--cache-dir",), "cache_dir", "str", "vLLM's compile cache, shared by deployments "
         "(default: $VLLM_CACHE_ROOT, else ~/.cache/vllm)"),
        (("--no-api-key",), "api_key", "off", "serve without the generated API key (warns)"),
        (("--open-metrics",), "open_metrics", "bool", "let /metrics answer without the key "
         "(for a site's Prometheus)"),
        (("--max-restarts",), "max_restarts", "int", "requeue a failed deployment up to N times (default 0)"),
        (("--auto-renew",), "auto_renew", "bool", "before the time limit, start a successor job that "
         "takes over once READY"),
        (("--renew-before",), "renew_before", "int", "minutes before the limit to submit it (default 30)"),
        (("--executor",), "executor", "str", "slurm (default) or local"),
        (("--profile",), "profile", "str", "named profile from your config"),
    ],
}
_SPEC_DESTS = {dest for group in _SPEC_OPTIONS.values() for _, dest, _, _ in group}


def _add_spec_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", metavar="MODEL", help="model name or path")
    for title, options in _SPEC_OPTIONS.items():
        group = parser.add_argument_group(title)
        for flags, dest, kind, help_text in options:
            if kind in ("bool", "off"):
                group.add_argument(*flags, dest=dest, action="store_const", const=kind == "bool",
                                   help=help_text)
            elif kind == "list":
                group.add_argument(*flags, dest=dest, action="append", metavar="VALUE", help=help_text)
            else:
                group.add_argument(*flags, dest=dest, type=int if kind == "int" else str,
                                   metavar=dest.split("_")[0].upper(), help=help_text)


def _spec_options(ns: argparse.Namespace, vllm_args: list[str]) -> tuple[dict[str, Any], str | None]:
    """(options for the API, profile) from parsed arguments."""
    options = {dest: getattr(ns, dest) for dest in _SPEC_DESTS}
    profile = options.pop("profile")
    flag_model, positional = options.pop("model_opt"), ns.model
    if positional is not None and flag_model not in (None, positional):
        raise HpcServeError(f"Two models given: {positional!r} and --model {flag_model!r}.",
                            "Give the model once.")
    options["model"] = positional or flag_model
    options["vllm_args"] = vllm_args or None
    return options, profile


def _console():
    from rich.console import Console

    return Console(highlight=False)


def _warn(messages: tuple[str, ...]) -> None:
    for message in messages:
        print(f"warning: {message}", file=sys.stderr)


def _command_line(argv: list[str], vllm_args: list[str]) -> str:
    import shlex

    words = ["hpc-serve", *argv] + (["--", *vllm_args] if vllm_args else [])
    return " ".join(shlex.quote(word) for word in words)


def cmd_render(ns: argparse.Namespace, vllm_args: list[str]) -> int:
    from ..api import resolve
    from ..job.sbatch import render_script

    options, profile = _spec_options(ns, vllm_args)
    spec, settings = resolve(profile=profile, **options)
    _warn(spec.warnings)
    script = render_script(spec, settings.sources, command=_command_line(ns.argv, vllm_args))
    if ns.output is None:
        sys.stdout.write(script)
        return 0
    import shlex
    from pathlib import Path

    try:
        Path(ns.output).write_text(script)
    except OSError as exc:
        raise HpcServeError(f"Cannot write {ns.output}: {exc.strerror}.", "Choose a writable path.") from None
    print(f"wrote {ns.output}  (submit it with: sbatch {shlex.quote(ns.output)})", file=sys.stderr)
    return 0


def cmd_plan(ns: argparse.Namespace, vllm_args: list[str]) -> int:
    from ..api import resolve
    from ..planner.launch import make_plan

    options, profile = _spec_options(ns, vllm_args)
    spec, settings = resolve(profile=profile, **options)
    launch = make_plan(spec)
    if ns.json:
        import json

        print(json.dumps({**launch.to_dict(), "sources": settings.sources}, indent=2))
        return 0
    from .plan_view import show_plan

    show_plan(launch, settings.sources, _console())
    _warn(spec.warnings)
    return 0


def cmd_config_show(ns: argparse.Namespace, vllm_args: list[str]) -> int:
    from rich.table import Table

    from ..planner.settings import resolve_settings
    from ..slurm import partition_gpus_per_node

    settings = resolve_settings({}, profile=ns.profile, gpus_probe=partition_gpus_per_node)
    table = Table(title=f"hpc-serve configuration (profile: {settings.profile or 'none'})")
    for column in ("key", "value") + (("from",) if ns.sources else ()):
        table.add_column(column)
    for key in sorted(settings.values):
        row = [key, repr(settings.values[key])]
        table.add_row(*(row + [settings.sources[key]] if ns.sources else row))
    _console().print(table)
    return 0


def _client_settings(profile: str | None = None) -> dict[str, Any]:
    """The resolved settings for commands that read deployments (home, login_host, ssh_cmd)."""
    from ..planner.settings import resolve_settings

    return resolve_settings({}, profile=profile).values


def _home() -> str:
    return _client_settings()["home"]


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def cmd_submit(ns: argparse.Namespace, vllm_args: list[str]) -> int:
    from ..api import resolve
    from ..job.submission import submit

    options, profile = _spec_options(ns, vllm_args)
    spec, settings = resolve(profile=profile, **options)
    _warn(spec.warnings)
    dep = submit(spec)
    print(f"submitted {dep.id} ({spec.name}): {spec.model} on {spec.layout.nodes} node(s)")
    print(f"registry: {dep.path}")
    print(f"follow it with: hpc-serve status {dep.id}   |   hpc-serve logs {dep.id} -f", flush=True)
    if ns.no_wait:
        return 0
    return _wait(dep, None, ns.timeout, settings.values.get("login_host"))


def _wait(target, home: str | None, timeout_s: float | None, login_host: str | None) -> int:
    from .wait_view import print_connect, wait_with_view

    try:
        status = wait_with_view(target, home, timeout_s)
    except KeyboardInterrupt:
        key = getattr(target, "id", target)
        print(f"stopped waiting; deployment {key} keeps running: hpc-serve wait {key} | "
              f"hpc-serve cancel {key}", file=sys.stderr)
        return 130
    from ..registry import Deployment, Registry, registry_root

    dep = target if isinstance(target, Deployment) else Registry(registry_root(home)).deployment(status.id)
    print_connect(dep, login_host)
    return 0


def cmd_wait(ns: argparse.Namespace, vllm_args: list[str]) -> int:
    settings = _client_settings()
    return _wait(ns.id, settings["home"], ns.timeout, settings.get("login_host"))


def _status_table(rows) -> None:
    """squeue-style aligned columns: fast for hundreds of rows, and easy to grep."""
    header = ("ID", "NAME", "MODEL", "LAYOUT", "SLURM", "PHASE", "ENDPOINT", "AGE")
    lines = [header]
    for row in rows:
        # one deployment: the phase with its reason's first line; many: the phase alone
        first, _, _rest = row.reason.partition("\n")
        phase = row.phase + (f": {first}" if first and len(rows) == 1 else "")
        lines.append((row.id, row.name, row.model, row.layout, row.slurm_state,
                      row.problem or phase, row.endpoint or "-", _age(row.age_s)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    for line in lines:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)) + "  " + line[-1])
    if len(rows) == 1 and "\n" in rows[0].reason:
        print("\n" + "\n".join("  " + line for line in rows[0].reason.splitlines()[1:]))
    if len(rows) == 1 and rows[0].restarts:
        print(f"\nrestarted {len(rows[0].restarts)} time(s):")
        print("\n".join("  " + line for line in rows[0].restarts))


def cmd_status(ns: argparse.Namespace, vllm_args: list[str]) -> int:
    from ..client import control as client

    home = _home()
    if ns.id:
        rows = [client.status(ns.id, home)]
    else:
        rows = client.statuses(home, include_ended=getattr(ns, "all", False))
    if ns.json:
        import json

        print(json.dumps([row.to_dict() for row in rows], indent=2))
    elif not rows:
        print("no live deployments (hpc-serve list --all shows ended ones)")
    else:
        _status_table(rows)
    return 0


def cmd_endpoint(ns: argparse.Namespace, vllm_args: list[str]) -> int:
    import json
    import shlex

    from ..client import control as client

    data = client.endpoint(ns.id, _home())
    if ns.json:
        keys = ("id", "url", "model", "served_model", "host", "hostname", "port", "api_key_file")
        print(json.dumps({key: data.get(key) for key in keys}, indent=2))
    elif ns.export:
        print(f"export OPENAI_BASE_URL={shlex.quote(data['url'])}")
        if data.get("api_key_file"):
            print(f"export OPENAI_API_KEY=\"$(cat {shlex.quote(data['api_key_file'])})\"")
    else:
        print(data["url"])
    return 0


def cmd_tunnel(ns: argparse.Namespace, vllm_args: list[str]) -> int:
    import shlex

    from ..registry import Registry, registry_root
    from ..client.tunnel import Tunnel, close_background, endpoint_target, start_background, tunnel_spec

    settings = _client_settings(ns.profile)
    home = settings["home"]
    dep = Registry(registry_root(home)).find(ns.id)
    if ns.close:
        closed = close_background(dep.path)
        if not closed:
            raise HpcServeError(f"Deployment {dep.id} has no background tunnel.",
                                f"Open one with: hpc-serve tunnel {dep.id} --via LOGIN-HOST --background")
        print(f"closed the tunnel(s) of {dep.id} on local port(s) {', '.join(map(str, closed))}")
        return 0
    spec, data = tunnel_spec(dep.id, ns.via or settings.get("login_host"), ns.local_port, ns.control, home,
                             settings.get("ssh_cmd") or "ssh")
    if ns.print:
        print(shlex.join(spec.argv()))
        return 0
    exports = [f"export OPENAI_BASE_URL={spec.url}"]
    if data.get("api_key_file"):
        exports.append(f'export OPENAI_API_KEY="$(cat {shlex.quote(data["api_key_file"])})"')
    if ns.background:
        pid = start_background(spec, dep.path)
        print(f"tunnel up (pid {pid}): {spec.url} -> {spec.host}:{spec.port} via {spec.via}")
        print("\n".join(exports))
        print(f"close it with: hpc-serve tunnel --close {dep.id}")
        return 0
    tunnel = Tunnel(spec)
    tunnel.open()
    print(f"tunnel up: {spec.url} -> {spec.host}:{spec.port} via {spec.via}")
    print("\n".join(exports), flush=True)
    print("Ctrl-C to close; the tunnel reconnects if ssh drops and follows the endpoint if the "
          "deployment restarts.", file=sys.stderr, flush=True)
    try:
        tunnel.supervise(lambda message: print(message, file=sys.stderr, flush=True),
                         target=endpoint_target(dep.path))
    except KeyboardInterrupt:
        pass
    finally:
        tunnel.close()
    print("tunnel closed", file=sys.stderr)
    return 0


def cmd_smoke(ns: argparse.Namespace, vllm_args: list[str]) -> int:
    from ..client import control as client
    from ..registry import Registry, registry_root
    from ..client.smoke import run_checks

    home = _home()
    data = client.endpoint(ns.id, home)
    url = ns.url or data["url"]
    key = Registry(registry_root(home)).deployment(data["id"]).api_key
    results = run_checks(url, key, data["served_model"])
    if ns.json:
        import json
        from dataclasses import asdict

        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        from rich.table import Table

        table = Table(title=f"smoke test of {data['id']} at {url}")
        for column in ("check", "result", "ms", "detail"):
            table.add_column(column, justify="right" if column == "ms" else "left")
        for r in results:
            shown = {True: "[green]PASS[/]", False: "[red]FAIL[/]", None: "[yellow]SKIP[/]"}[r.ok]
            table.add_row(r.name, shown, f"{r.seconds * 1000:.0f}", r.detail)
        _console().print(table)
    failed = [r.name for r in results if r.ok is False]
    passed = sum(r.ok is True for r in results)
    print(f"{passed} passed, {len(failed)} failed, {len(results) - passed - len(failed)} skipped"
          + (f": {', '.join(failed)}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


def cmd_logs(ns: argparse.Namespace, vllm_args: list[str]) -> int:
    from ..client import control as client

    home = _home()
    lines = client.follow(ns.id, ns.node, home) if ns.follow else client.log_lines(ns.id, ns.node, home)[1]
    for line in lines:
        print(line, flush=ns.follow)
    return 0


def cmd_cancel(ns: argparse.Namespace, vllm_args: list[str]) -> int:
    from ..client import control as client

    home = _home()
    if ns.all:
        rows = client.cancel_all(home)
        print(f"cancelled {len(rows)} deployment(s)" + (": " + ", ".join(r.id for r in rows) if rows else ""))
        return 0
    if not ns.id:
        raise HpcServeError("Say which deployment to cancel.", "hpc-serve cancel ID, or --all.")
    row = client.cancel(ns.id, home)
    print(f"cancelled {row.id}: {row.phase}, Slurm: {row.slurm_state}")
    return 0


def cmd_demo(ns: argparse.Namespace, vllm_args: list[str]) -> int:
    from ..demo import run_demo

    return run_demo(keep=ns.keep)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpc-serve",
        description="Serve LLMs with vLLM on Slurm: TP inside nodes, PP/DP across them, one command. "
                    "Arguments after -- go to vLLM.",
    )
    parser.add_argument("--version", action="version", version=f"hpc-serve {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    render = commands.add_parser("render", help="print the sbatch script for a deployment")
    _add_spec_options(render)
    render.add_argument("--output", "-o", metavar="FILE", help="write the script to FILE")
    render.set_defaults(handler=cmd_render)

    plan = commands.add_parser("plan", help="show the layout, roles and exact commands per node")
    _add_spec_options(plan)
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.set_defaults(handler=cmd_plan)

    submit = commands.add_parser("submit", help="submit a deployment (submitit; Slurm or --executor local)")
    _add_spec_options(submit)
    submit.add_argument("--no-wait", action="store_true", help="return once the job is submitted")
    submit.add_argument("--timeout", type=float, metavar="SECONDS",
                        help="give up waiting this long after the job starts running (queue time not counted)")
    submit.set_defaults(handler=cmd_submit)

    wait = commands.add_parser("wait", help="wait until a deployment is READY (exit 1 if it ends first)")
    wait.add_argument("id", metavar="ID", help="job id or name")
    wait.add_argument("--timeout", type=float, metavar="SECONDS",
                      help="give up this long after the job starts running (queue time not counted)")
    wait.set_defaults(handler=cmd_wait)

    for name, help_text in (("status", "show deployments (live ones, or one by ID)"),
                            ("list", "list deployments")):
        sub = commands.add_parser(name, help=help_text)
        if name == "status":
            sub.add_argument("id", nargs="?", metavar="ID", help="job id or name")
        else:
            sub.set_defaults(id=None)
            sub.add_argument("--all", action="store_true", help="include ended deployments")
        sub.add_argument("--json", action="store_true", help="machine-readable output")
        sub.set_defaults(handler=cmd_status)

    endpoint = commands.add_parser("endpoint", help="print a READY deployment's endpoint URL")
    endpoint.add_argument("id", metavar="ID", help="job id or name")
    shown = endpoint.add_mutually_exclusive_group()
    shown.add_argument("--export", action="store_true", help="print shell exports for OpenAI clients")
    shown.add_argument("--json", action="store_true", help="url, model, host, port and the key file's path")
    endpoint.set_defaults(handler=cmd_endpoint)

    tunnel = commands.add_parser("tunnel", help="SSH tunnel from this machine to a READY deployment")
    tunnel.add_argument("id", metavar="ID", help="job id or name")
    tunnel.add_argument("--via", metavar="[USER@]HOST", help="login host (default: login_host from config)")
    tunnel.add_argument("--local-port", type=int, metavar="P", help="local port (default: a free one)")
    tunnel.add_argument("--control", action="store_true", help="share one ssh connection (one MFA prompt)")
    tunnel.add_argument("--profile", help="named profile (for login_host)")
    mode = tunnel.add_mutually_exclusive_group()
    mode.add_argument("--background", action="store_true", help="detach; close with --close")
    mode.add_argument("--print", action="store_true", help="only print the ssh command")
    mode.add_argument("--close", action="store_true", help="close this deployment's background tunnels")
    tunnel.set_defaults(handler=cmd_tunnel)

    smoke = commands.add_parser("smoke", help="check that a READY deployment serves the OpenAI API")
    smoke.add_argument("id", metavar="ID", help="job id or name")
    smoke.add_argument("--url", help="base URL to test instead (e.g. a tunnel's http://127.0.0.1:P/v1)")
    smoke.add_argument("--json", action="store_true", help="machine-readable results")
    smoke.set_defaults(handler=cmd_smoke)

    logs = commands.add_parser("logs", help="show a node's log of a deployment")
    logs.add_argument("id", metavar="ID", help="job id or name")
    logs.add_argument("--node", type=int, default=0, help="node rank (default 0)")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing until it ends")
    logs.set_defaults(handler=cmd_logs)

    cancel = commands.add_parser("cancel", help="stop a deployment and wait until its job is gone")
    cancel.add_argument("id", nargs="?", metavar="ID", help="job id or name")
    cancel.add_argument("--all", action="store_true", help="cancel every live deployment")
    cancel.set_defaults(handler=cmd_cancel)

    demo = commands.add_parser("demo", help="serve a tiny model on 2 nodes of a throwaway local Slurm cluster (root)")
    demo.add_argument("--keep", action="store_true", help="leave the cluster and deployment running")
    demo.set_defaults(handler=cmd_demo)

    config = commands.add_parser("config", help="inspect the layered configuration")
    config_commands = config.add_subparsers(dest="config_command", metavar="COMMAND", required=True)
    show = config_commands.add_parser("show", help="show the resolved configuration")
    show.add_argument("--sources", action="store_true", help="say where each value came from")
    show.add_argument("--profile", help="named profile")
    show.set_defaults(handler=cmd_config_show)

    return parser


def main(argv: list[str] | None = None) -> int:
    """Console entry point: split off `-- VLLM_ARGS`, run the command, map errors to exit codes."""
    args = list(sys.argv[1:] if argv is None else argv)
    vllm_args: list[str] = []
    if "--" in args:
        cut = args.index("--")
        args, vllm_args = args[:cut], args[cut + 1:]
    debug = "--debug" in args or os.environ.get("HPC_SERVE_DEBUG") == "1"
    parser = build_parser()
    try:
        ns = parser.parse_args(args)
    except SystemExit as exc:  # --help, --version, or a usage error (argparse says why)
        return int(exc.code or 0)
    if ns.command is None:
        parser.print_help()
        return 2
    ns.argv = [a for a in args if a != "--debug"]
    try:
        return ns.handler(ns, vllm_args)
    except HpcServeError as exc:
        if debug:
            raise
        exc.report()
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
