"""The `hpc-serve` argument parser.

The deployment flags of `submit`, `render` and `plan` are generated from the options table
(planner/options.py): a flag's name, short alias, kind and help come from there, and a flag left
out is None ("not given": the lower settings layers decide). The other commands' flags are here.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..planner.options import AUTO, AUTO_OPTIONS, OPTIONS, Option
from ..version import __version__

#: The help groups of the deployment flags, in order (``Option.group``).
SPEC_GROUPS = ("layout", "resources", "node setup", "fleet")
#: The flags of submit/render/plan: the options that have a help group.
SPEC_FLAGS: tuple[Option, ...] = tuple(option for option in OPTIONS if option.group is not None)


def _int_or_auto(text: str) -> int | str:
    if text == AUTO:
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value: {text!r} (a whole number, or {AUTO})") from None


def _dest(option: Option) -> str:
    return "model_opt" if option.name == "model" else option.name  # `model` is the positional MODEL


def add_spec_options(parser: argparse.ArgumentParser) -> None:
    """MODEL and every deployment flag, in the table's help groups; then --profile."""
    parser.add_argument("model", nargs="?", metavar="MODEL", help="model name or path")
    groups = {title: parser.add_argument_group(title) for title in SPEC_GROUPS}
    for option in SPEC_FLAGS:
        flags, dest, group = (option.flag, *option.aliases), _dest(option), groups[option.group]
        if option.kind == "bool":
            group.add_argument(*flags, dest=dest, action="store_const", const=not option.default, help=option.help)
        elif option.kind == "list":
            group.add_argument(*flags, dest=dest, action="append", metavar="VALUE", help=option.help)
        else:
            kind = _int_or_auto if option.name in AUTO_OPTIONS else int if option.kind == "int" else str
            group.add_argument(*flags, dest=dest, type=kind,
                               metavar=option.name.split("_")[0].upper(), help=option.help)
    groups["node setup"].add_argument("--profile", metavar="PROFILE", help="named profile from your config")


def spec_options(ns: argparse.Namespace) -> dict[str, Any]:
    """The deployment options given on the command line, by option name (None: not given)."""
    return {option.name: getattr(ns, _dest(option)) for option in SPEC_FLAGS}


def _id(parser: argparse.ArgumentParser, optional: bool = False) -> None:
    parser.add_argument("id", nargs="?" if optional else None, metavar="ID", help="job id or name")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: every command and its flags (``command``: the handler's key in
    cli/commands.py's HANDLERS)."""
    parser = argparse.ArgumentParser(
        prog="hpc-serve",
        description="Serve LLMs with vLLM on Slurm: TP inside nodes, PP/DP across them, one command. "
                    "Arguments after -- go to vLLM.",
    )
    parser.add_argument("--version", action="version", version=f"hpc-serve {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    render = sub.add_parser("render", help="print the sbatch script for a deployment")
    add_spec_options(render)
    render.add_argument("--output", "-o", metavar="FILE", help="write the script to FILE")

    plan = sub.add_parser("plan", help="show the layout, roles and exact commands per node")
    add_spec_options(plan)
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.add_argument("--suggest", action="store_true",
                      help="pick the layout from the model (as --tp auto) and show the arithmetic")

    submit = sub.add_parser("submit", help="submit a deployment (submitit; Slurm or --executor local)")
    add_spec_options(submit)
    submit.add_argument("--no-wait", action="store_true", help="return once the job is submitted")
    submit.add_argument("--timeout", type=float, metavar="SECONDS",
                        help="give up waiting this long after the job starts running (queue time not counted)")

    wait = sub.add_parser("wait", help="wait until a deployment is READY (exit 1 if it ends first)")
    _id(wait)
    wait.add_argument("--timeout", type=float, metavar="SECONDS",
                      help="give up this long after the job starts running (queue time not counted)")

    status = sub.add_parser("status", help="show deployments (live ones, or one by ID)")
    _id(status, optional=True)
    status.add_argument("--watch", action="store_true", help="with ID: redraw every 2 s (what the server does now)")
    listing = sub.add_parser("list", help="list deployments")
    listing.set_defaults(id=None)
    listing.add_argument("--all", action="store_true", help="include ended deployments")
    for shown in (status, listing):
        shown.add_argument("--json", action="store_true", help="machine-readable output")

    endpoint = sub.add_parser("endpoint", help="print a READY deployment's endpoint URL")
    _id(endpoint)
    form = endpoint.add_mutually_exclusive_group()
    form.add_argument("--export", action="store_true", help="print shell exports for OpenAI clients")
    form.add_argument("--json", action="store_true", help="url, model, host, port and the key file's path")

    tunnel = sub.add_parser("tunnel", help="SSH tunnel from this machine to a READY deployment")
    _id(tunnel)
    tunnel.add_argument("--via", metavar="[USER@]HOST", help="login host (default: login_host from config)")
    tunnel.add_argument("--local-port", type=int, metavar="P", help="local port (default: a free one)")
    tunnel.add_argument("--control", action="store_true", help="share one ssh connection (one MFA prompt)")
    tunnel.add_argument("--profile", help="named profile (for login_host)")
    mode = tunnel.add_mutually_exclusive_group()
    mode.add_argument("--background", action="store_true", help="detach; close with --close")
    mode.add_argument("--print", action="store_true", help="only print the ssh command")
    mode.add_argument("--close", action="store_true", help="close this deployment's background tunnels")

    smoke = sub.add_parser("smoke", help="check that a READY deployment serves the OpenAI API")
    _id(smoke)
    smoke.add_argument("--url", help="base URL to test instead (e.g. a tunnel's http://127.0.0.1:P/v1)")
    smoke.add_argument("--json", action="store_true", help="machine-readable results")

    fetch = sub.add_parser("fetch", help="download a model from the Hugging Face hub into the cache the jobs read")
    fetch.add_argument("model", metavar="MODEL", help="hub id, e.g. Qwen/Qwen2.5-7B-Instruct")
    fetch.add_argument("--revision", help="branch, tag or commit (default: main)")
    fetch.add_argument("--hf-home", metavar="DIR",
                       help="the Hugging Face cache every node reads (default: hf_home from config, else HF_HOME)")
    fetch.add_argument("--all-files", action="store_true",
                       help="also the files vLLM does not load (original/, .pth, .gguf, .onnx, ...)")
    fetch.add_argument("--profile", help="named profile (for hf_home)")

    bench = sub.add_parser("bench", help="run vLLM's benchmark (vllm bench serve) against a READY deployment; "
                                         "flags after -- go to it")
    _id(bench)
    bench.add_argument("--compare", metavar="ID2", help="run the same load against a second deployment, side by side")
    bench.add_argument("--input-len", type=int, default=256, metavar="N", help="tokens per prompt (default 256)")
    bench.add_argument("--output-len", type=int, default=128, metavar="N",
                       help="tokens per answer, exactly (ignore_eos; default 128)")
    bench.add_argument("--prompts", type=int, default=200, metavar="N", help="requests in all (default 200)")
    bench.add_argument("--rate", type=float, metavar="R", help="requests per second (default: all at once)")
    bench.add_argument("--concurrency", type=int, metavar="N", help="at most N requests at a time (default: no limit)")
    bench.add_argument("--chat", action="store_true", help="chat completions instead of completions")
    bench.add_argument("--seed", type=int, default=0,
                       help="random prompts' seed (default 0: the same prompts each run)")
    bench.add_argument("--tokenizer", metavar="NAME_OR_PATH",
                       help="tokenizer for the prompts (default: the deployment's model)")
    bench.add_argument("--vllm-cmd", metavar="CMD",
                       help="vLLM to run it with (default: vllm on PATH, else the deployment's engine command)")
    bench.add_argument("--json", action="store_true", help="print vLLM's results as JSON")

    scale = sub.add_parser("scale", help="change how many replicas a group (submit --replicas) serves with")
    _id(scale)
    scale.add_argument("count", type=int, metavar="N", help="replicas wanted (more are submitted, the newest cancelled)")

    logs = sub.add_parser("logs", help="show a node's log of a deployment")
    _id(logs)
    logs.add_argument("--node", type=int, default=0, help="node rank (default 0)")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing until it ends")

    cancel = sub.add_parser("cancel", help="stop a deployment and wait until its job is gone")
    _id(cancel, optional=True)
    cancel.add_argument("--all", action="store_true", help="cancel every live deployment")

    demo = sub.add_parser("demo", help="serve a tiny model on 2 nodes of a throwaway local Slurm cluster (root)")
    demo.add_argument("--keep", action="store_true", help="leave the cluster and deployment running")

    config = sub.add_parser("config", help="inspect the layered configuration")
    config_commands = config.add_subparsers(dest="config_command", metavar="COMMAND", required=True)
    show = config_commands.add_parser("show", help="show the resolved configuration")
    show.add_argument("--sources", action="store_true", help="say where each value came from")
    show.add_argument("--profile", help="named profile")
    return parser
