"""Reading GPUs per node from sinfo's gres column (the parser, and a fake sinfo on PATH)."""

import pytest

from hpc_serve.slurm import parse_gres_gpus


@pytest.mark.parametrize("text,gpus", [
    ("gpu:8\n", 8), ("gpu:a100:4(S:0-1)\n", 4), ("gpu:h100:8,shard:32\ngpu:a100:4\n", 8),
    ("(null)\n", None), ("", None), ("mps:100\n", None),
])
def test_parse_gres(text, gpus):
    assert parse_gres_gpus(text) == gpus


def test_gpus_per_node_from_a_fake_sinfo(tmp_path, monkeypatch):
    from hpc_serve.slurm import partition_gpus_per_node

    from .test_slurm import fake_tool

    monkeypatch.setenv("PATH", str(tmp_path))
    assert partition_gpus_per_node("gpu") is None  # no sinfo: the laptop's plan goes on without it
    fake_tool(tmp_path, "sinfo", out="gpu:a100:4(S:0-1)\ngpu:8\n")
    assert partition_gpus_per_node("gpu") == (8, "sinfo (partition gpu)")
    assert (tmp_path / "sinfo.args").read_text() == "--noheader --format=%G --partition gpu\n"
    fake_tool(tmp_path, "sinfo", out="(null)\n")
    assert partition_gpus_per_node(None) is None  # silent
    fake_tool(tmp_path, "sinfo", fail_times=99, err="sinfo: error: Invalid partition name specified")
    assert partition_gpus_per_node("nosuch") is None
