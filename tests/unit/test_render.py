"""Rendering: golden files, quoting, StrictUndefined, and sbatch/ kept in step with templates/."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpc_serve.errors import HpcServeError
from hpc_serve.job.sbatch import render_script, render_template
from hpc_serve.planner.spec import build_spec

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden"


def full_spec(tmp_path_factory=None, image="docker://vllm/vllm-openai:v0.32.0"):
    return build_spec(
        model="org/model with 'quote", gpus_per_node=4, nodes=2, tp=4, pp=2, partition="gpu",
        account="proj-1", qos="high", time="1-00:00:00", constraint="a100&ib", exclusive=True,
        cpus_per_node=64, mem="256G", name="my-job", env=["VLLM_LOGGING_LEVEL=DEBUG", "X=a b$c"],
        setup=["module load cuda/12.4", "source /opt/venvs/vllm/bin/activate"], container=image,
        vllm_args=["--max-model-len", "8192", "--override-generation-config", '{"temperature": 0}'],
        port=8443,
    )


def _check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"golden file {name} missing: run with UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name} changed: review, then UPDATE_GOLDEN=1 pytest"


def _stable(text: str) -> str:
    return text.replace(str(ROOT), "<repo>")


def test_golden_full_options():
    _check_golden("full-pyxis.sbatch", _stable(render_script(full_spec(), {"gpus_per_node": "given"})))


def test_golden_apptainer(tmp_path):
    image = tmp_path / "vllm.sif"
    image.write_bytes(b"sif")
    text = render_script(full_spec(image=str(image)), {"gpus_per_node": "given"})
    _check_golden("apptainer.sbatch", _stable(text).replace(str(image), "<image>"))


def test_script_is_valid_bash_and_quotes_every_value():
    text = render_script(full_spec(), {})
    done = subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True)
    assert done.returncode == 0, done.stderr
    assert "export X='a b$c'" in text
    assert "MODEL=${MODEL:-'org/model with '\"'\"'quote'}" in text
    assert "'{\"temperature\": 0}'" in text


def test_model_override_through_the_environment(tmp_path):
    text = render_script(build_spec(model="org/it's default", gpus_per_node=1), {})
    head = text[: text.index("# One node agent")] + 'printf "%s" "$MODEL"\n'
    for env, expected in (({}, "org/it's default"), ({"MODEL": "org/other"}, "org/other")):
        done = subprocess.run(["bash", "-c", head], env={"PATH": os.environ["PATH"], **env},
                              capture_output=True, text=True)
        assert done.stdout == expected, done.stderr


def test_no_secret_or_api_key_in_scripts():
    text = render_script(full_spec(), {})
    assert "API_KEY" not in text and "HF_TOKEN=" not in text


def test_strict_undefined_fails_loudly():
    import jinja2

    with pytest.raises(jinja2.UndefinedError):
        render_template("partials/header.j2", spec=full_spec())  # no `layout`


def test_sbatch_scripts_match_the_templates():
    sys.path.insert(0, str(ROOT / "sbatch"))
    try:
        import generate
    finally:
        sys.path.pop(0)
    scripts = generate.scripts()
    assert set(scripts) == {p.name for p in (ROOT / "sbatch").glob("*.sbatch")}
    for name, text in scripts.items():
        assert (ROOT / "sbatch" / name).read_text() == text, f"sbatch/{name} drifted: run make sbatch"


def _node_line_spec(script: str):
    """The spec the node agent builds from a script's srun line (the model as the script sets it)."""
    import shlex

    from hpc_serve.node.args import node_spec

    model = shlex.split(script.split("\nMODEL=${MODEL:-")[1].split("}\n")[0])[0]
    line = script[script.index("-m hpc_serve.node"):].split("\n")[0]
    return node_spec(shlex.split(line.replace('"$MODEL"', shlex.quote(model)))[2:])


def test_sbatch_scripts_parse_back_to_their_layout():
    for path in sorted((ROOT / "sbatch").glob("*.sbatch")):
        text = path.read_text()
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
        spec = _node_line_spec(text)
        nodes = int(text.split("#SBATCH --nodes=")[1].split("\n")[0])
        gpus = int(text.split("#SBATCH --gpus-per-node=")[1].split("\n")[0])
        assert (spec.layout.nodes, spec.layout.gpus_per_node) == (nodes, gpus), path.name
        assert f"--job-name={spec.name}\n" in text and f"--time={spec.time}\n" in text, path.name


@pytest.mark.parametrize("image", ["docker://vllm/vllm-openai:v0.32.0", "file"])
def test_the_node_of_a_rendered_script_records_the_login_sides_spec(image, tmp_path):
    """On the sbatch path the node writes spec.json: it is the spec `render` had, field for field."""
    if image == "file":
        image = tmp_path / "vllm.sif"
        image.write_bytes(b"sif")
    spec = full_spec(image=str(image))
    assert _node_line_spec(render_script(spec, {})).to_dict() == spec.to_dict()


def test_what_each_node_asks_for_reaches_the_step_and_the_plan():
    whole = build_spec(model="org/m", gpus_per_node=8, exclusive=True, cpus_per_node=96, executor="local")
    script = render_script(whole)
    assert "#SBATCH --mem=0\n" in script and "#SBATCH --cpus-per-task=96\n" in script
    assert "  --cpus-per-task=96 \\\n" in script  # srun (Slurm >= 22.05) does not inherit it
    assert whole.resources_text() == "per node: 8 GPUs, 96 CPUs (also given to each node's step), all its memory; whole nodes (--exclusive)"
    shared = build_spec(model="org/m", gpus_per_node=2, mem="64G", executor="local")
    assert "#SBATCH --mem=64G\n" in render_script(shared) and "--cpus-per-task" not in render_script(shared)
    assert build_spec(model="org/m", gpus_per_node=2, executor="local").resources_text() == \
        "per node: 2 GPUs, the partition's default CPUs, the partition's default memory"
    done = subprocess.run([sys.executable, "-m", "hpc_serve", "plan", "org/m", "--gpus-per-node", "8", "--exclusive"],
                          capture_output=True, text=True)
    shown = " ".join(done.stdout.split())  # rich wraps long lines
    assert "Slurm is asked for 1 node(s); per node: 8 GPUs, the partition's default CPUs, all its memory" in shown
