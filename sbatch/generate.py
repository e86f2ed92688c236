"""Regenerate the ready-to-run scripts in sbatch/ from templates/ (`make sbatch`).

The scenarios are those of vLLM's distributed serving guide. A unit test renders them again
and fails if a checked-in script drifts from the templates.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from hpc_serve.job.sbatch import render_script
from hpc_serve.planner.spec import build_spec

HERE = Path(__file__).resolve().parent

#: file name -> (model, options) exactly as `hpc-serve render` takes them.
SCENARIOS: dict[str, tuple[str, dict]] = {
    "single-gpu.sbatch": ("Qwen/Qwen2.5-7B-Instruct", {"gpus_per_node": 1}),
    "tp8-one-node.sbatch": ("meta-llama/Llama-3.3-70B-Instruct", {"gpus_per_node": 8, "tp": 8}),
    "tp4-pp2-two-nodes.sbatch": ("meta-llama/Llama-3.3-70B-Instruct",
                                 {"gpus_per_node": 4, "nodes": 2, "tp": 4, "pp": 2}),
    "tp8-pp2-two-nodes.sbatch": ("meta-llama/Llama-3.1-405B-Instruct",
                                 {"gpus_per_node": 8, "nodes": 2, "tp": 8, "pp": 2}),
    "tp8-dp2-ray.sbatch": ("Qwen/Qwen2.5-72B-Instruct",
                           {"gpus_per_node": 8, "tp": 8, "dp": 2, "launcher": "ray"}),
    "moe-ep-two-nodes.sbatch": ("Qwen/Qwen3-235B-A22B-Instruct-2507",
                                {"gpus_per_node": 8, "tp": 8, "dp": 2, "ep": True,
                                 "all2all_backend": "allgather_reducescatter"}),
}
COMMON = {"time": "04:00:00"}


def _command(model: str, options: dict) -> str:
    words = ["hpc-serve", "render", model]
    for key, value in {**options, **COMMON}.items():
        flag = "--" + key.replace("_", "-")
        words += [flag] if value is True else [flag, str(value)]
    return " ".join(shlex.quote(w) for w in words)


def scripts() -> dict[str, str]:
    """Every scenario's script text, rendered from the templates."""
    out = {}
    for filename, (model, options) in SCENARIOS.items():
        spec = build_spec(model=model, name=filename.removesuffix(".sbatch"), **COMMON, **options)
        out[filename] = render_script(spec, {"gpus_per_node": "given"}, command=_command(model, options))
    return out


def main() -> int:
    for filename, text in scripts().items():
        (HERE / filename).write_text(text)
        print(f"wrote sbatch/{filename}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
