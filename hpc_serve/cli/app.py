"""The `hpc-serve` command (entry point ``hpc_serve.cli.app:main``).

cli/parser.py builds the command line (the deployment flags from the options table),
cli/commands.py runs each command through hpc_serve.api and hpc_serve.client, cli/views.py
writes what they show. Here, once: HpcServeError becomes its two lines (problem, hint) on stderr
and exit code 2; ``--debug`` (or HPC_SERVE_DEBUG=1) shows the traceback instead. Everything after
``--`` goes to vLLM. argparse keeps start-up fast: `--help` and `render` stay well under 0.2 s.
"""

from __future__ import annotations

import os
import sys

from ..errors import HpcServeError


def main(argv: list[str] | None = None) -> int:
    """Console entry point: split off `-- VLLM_ARGS`, run the command, map errors to exit codes."""
    from .commands import HANDLERS
    from .parser import build_parser

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
        return HANDLERS[ns.command](ns, vllm_args)
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
