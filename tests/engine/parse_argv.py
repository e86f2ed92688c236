"""Parse argv lists with vLLM's own `vllm serve` parser (run with the vLLM venv's python).

stdin: JSON list of argv lists (each starting with "vllm", "serve"); stdout: JSON list of the
parsed values that matter for the layout, or an error string per argv.
"""

import json
import sys

from vllm.entrypoints.cli.serve import ServeSubcommand
from vllm.utils.argparse_utils import FlexibleArgumentParser

KEYS = ("model_tag", "tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size",
        "data_parallel_size_local", "data_parallel_backend", "distributed_executor_backend", "nnodes",
        "node_rank", "headless", "enable_expert_parallel", "all2all_backend", "data_parallel_start_rank")

parser = FlexibleArgumentParser()
ServeSubcommand().subparser_init(parser.add_subparsers(dest="subparser"))
out = []
for argv in json.load(sys.stdin):
    try:
        args = parser.parse_args(argv[1:])
        out.append({key: getattr(args, key, None) for key in KEYS})
    except SystemExit:
        out.append("rejected")
print(json.dumps(out))
