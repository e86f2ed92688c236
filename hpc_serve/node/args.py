"""The node agent's command line: written by the templates, parsed by `python -m hpc_serve.node`.

Both sides come from the options table (planner/options.py): the argv carries every option of the
spec that differs from its default (the layout as resolved), so that the node rebuilds the very
spec the login side built, and the registry's spec.json is the same on both submission paths.
The parser has no defaults of its own: what the argv leaves out takes the table's default.
Older scripts, which carry fewer options, still parse. Stdlib only: this runs inside the
allocation, where the CLI's dependencies may be missing.
"""

from __future__ import annotations

import argparse
import shlex
from typing import Any

from ..planner.options import NODE_OPTIONS, PASSTHROUGH, option_words
from ..planner.spec import DeploymentSpec, spec_from_options


def to_node_args(spec: DeploymentSpec) -> list[str]:
    """The spec as the node agent's options (the model comes separately, as --model "$MODEL")."""
    values = spec.options()
    args = [word for option in NODE_OPTIONS if option.name != PASSTHROUGH
            for word in option_words(option, values[option.name])]
    return args + (["--", *spec.vllm_args] if spec.vllm_args else [])


def parser() -> argparse.ArgumentParser:
    """The agent's argparse parser; an option left out is absent from the result."""
    p = argparse.ArgumentParser(prog="python -m hpc_serve.node", argument_default=argparse.SUPPRESS,
                                description="hpc-serve node agent: runs once per node of a job.")
    p.add_argument("--model", required=True)
    for option in NODE_OPTIONS:
        if option.name == PASSTHROUGH:
            continue
        if option.kind == "bool":
            p.add_argument(option.flag, dest=option.name, action="store_const", const=not option.default)
        elif option.kind == "list":
            p.add_argument(option.flag, dest=option.name, action="append")
        else:
            p.add_argument(option.flag, dest=option.name, type=int if option.kind == "int" else str)
    p.add_argument(PASSTHROUGH, nargs="*")
    return p


def parse_node_args(argv: list[str]) -> dict[str, Any]:
    """Keyword arguments for build_spec from the node agent's argv (only the options it gives)."""
    values = vars(parser().parse_args(argv))
    if PASSTHROUGH in values:
        values[PASSTHROUGH] = tuple(values[PASSTHROUGH])
    return values


def node_spec(argv: list[str], home: str | None = None) -> DeploymentSpec:
    """The deployment spec a node agent runs, from its argv (validated like the login side's,
    except the login side's files). ``home``: the registry the submitting side chose."""
    values = parse_node_args(argv)
    return spec_from_options({**values, **({"home": home} if home else {})}, on_node=True)


def node_command(spec: DeploymentSpec) -> str:
    """The shell words after `python -m hpc_serve.node --model "$MODEL"`, quoted."""
    return " ".join(shlex.quote(arg) for arg in to_node_args(spec))
