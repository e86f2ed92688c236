"""One Slurm request: the rendered script and the submitit job ask Slurm for the same things."""

import re

import pytest

from hpc_serve.job.request import SIGNAL_BEFORE_END_S, slurm_request
from hpc_serve.job.sbatch import render_script
from hpc_serve.planner.spec import build_spec

SPECS = {
    "full": dict(model="org/m", gpus_per_node=4, nodes=2, tp=4, pp=2, partition="gpu", account="proj-1",
                 qos="high", time="1-00:00:00", constraint="a100&ib", exclusive=True, cpus_per_node=64,
                 mem="256G", name="my-job"),
    "exclusive, no mem": dict(model="org/m", gpus_per_node=8, tp=8, exclusive=True),
    "bare": dict(model="org/m", gpus_per_node=1),
}


def _directives(script: str) -> dict[str, str]:
    """The #SBATCH options of a script, as {option: value} ('' for a flag)."""
    found = {}
    for line in script.splitlines():
        match = re.match(r"#SBATCH --([\w-]+)(?:=(.*))?$", line)
        if match:
            found[match[1]] = (match[2] or "").strip("'")  # submitit quotes some values
    return found


@pytest.mark.parametrize("name", SPECS)
def test_the_script_and_submitit_ask_for_the_same_resources(name, tmp_path):
    from submitit.slurm.slurm import _make_sbatch_string

    spec = build_spec(**SPECS[name])
    ours = _directives(render_script(spec))
    theirs = _directives(_make_sbatch_string("python -c pass", str(tmp_path), **slurm_request(spec).submitit_parameters()))
    # submitit's own bookkeeping (its log files, its signal: USR2 to the tasks) aside, every value agrees
    for option in ("output", "error", "open-mode", "signal", "wckey"):
        ours.pop(option, None)
        theirs.pop(option, None)
    # the time limit: D-HH:MM:SS in the script, minutes for submitit
    assert ("time" in ours) == ("time" in theirs) == (spec.time is not None)
    if spec.time is not None:
        assert ours.pop("time") == spec.time and int(theirs.pop("time")) == spec.time_minutes == 1440
    assert ours == theirs


@pytest.mark.parametrize("name", SPECS)
def test_both_paths_requeue_and_signal_before_the_end(name, tmp_path):
    from submitit.slurm.slurm import _make_sbatch_string

    spec = build_spec(**SPECS[name])
    script = render_script(spec)
    submitted = _make_sbatch_string("python -c pass", str(tmp_path), **slurm_request(spec).submitit_parameters())
    for text in (script, submitted):
        assert "#SBATCH --requeue" in text
        assert re.search(rf"#SBATCH --signal=(B:USR1|USR2)@{SIGNAL_BEFORE_END_S}\n", text)
        assert re.search(r"srun .*--kill-on-bad-exit=1", text.replace("\\\n", " "))
    if spec.cpus_per_node:  # the step gets its CPUs on both paths (srun does not inherit them)
        assert f"--cpus-per-task={spec.cpus_per_node}" in script.split("exec srun", 1)[1]
        assert f"--cpus-per-task={spec.cpus_per_node}" in submitted.split("srun", 1)[1]


def test_an_exclusive_job_asks_for_all_of_each_nodes_memory():
    assert "--mem=0" in slurm_request(build_spec(**SPECS["exclusive, no mem"])).directives()
    assert not any(d.startswith("--mem") for d in slurm_request(build_spec(**SPECS["bare"])).directives())
