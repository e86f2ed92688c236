"""The Python API: the same rules as the CLI, typed results, unknown options named."""

import pytest

import hpc_serve
from hpc_serve.errors import HpcServeError


def test_plan_returns_a_launch_plan():
    launch = hpc_serve.plan("org/m", nodes=2, tp=8, pp=2, gpus_per_node=8)
    assert launch.spec.layout.dp == 1 and [n.rank for n in launch.nodes] == [0, 1]


def test_render_returns_the_script():
    assert "#SBATCH --nodes=2" in hpc_serve.render("org/m", tp=8, dp=2, gpus_per_node=8)


def test_unknown_option_lists_valid_ones():
    with pytest.raises(HpcServeError, match="Unknown option 'tensor_parallel_size'") as err:
        hpc_serve.plan("org/m", tensor_parallel_size=8)
    assert "tp" in err.value.hint


def test_model_given_twice():
    with pytest.raises(HpcServeError, match="Two models given"):
        hpc_serve.resolve("a", model="b")


def test_import_is_light():
    import subprocess
    import sys

    code = "import sys, hpc_serve; print(sorted(m for m in ('jinja2','rich','json','hpc_serve.planner.launch') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"
