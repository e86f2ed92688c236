"""The node agent: `python -m hpc_serve.node ...`, one task per node inside the allocation.

Stdlib only. This version validates the job's layout on the node and prints the node's plan;
starting Ray and vLLM comes with the engine release, and until then the agent says so and exits 2.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict

from .errors import HpcServeError
from .node_args import parse_node_args
from .launch import node_plan
from .spec import build_spec


def main(argv: list[str] | None = None) -> int:
    """Entry point of one node's task; returns the exit code."""
    try:
        spec = build_spec(executor="local", **parse_node_args(sys.argv[1:] if argv is None else argv))
        rank = int(os.environ.get("SLURM_NODEID", "0"))
        print(json.dumps(asdict(node_plan(spec, rank)), indent=2))
        raise HpcServeError(
            "The node agent validated its plan, but starting Ray/vLLM is not built yet in this version.",
            "Use a release with the engine, or run the printed argv by hand.",
        )
    except HpcServeError as exc:
        print(f"hpc-serve node: {exc.problem}", file=sys.stderr)
        if exc.hint:
            print(exc.hint, file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
