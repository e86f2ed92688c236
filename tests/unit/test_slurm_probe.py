"""Reading GPUs per node from sinfo's gres column."""

import pytest

from hpc_serve.slurm import parse_gres_gpus


@pytest.mark.parametrize("text,gpus", [
    ("gpu:8\n", 8), ("gpu:a100:4(S:0-1)\n", 4), ("gpu:h100:8,shard:32\ngpu:a100:4\n", 8),
    ("(null)\n", None), ("", None), ("mps:100\n", None),
])
def test_parse_gres(text, gpus):
    assert parse_gres_gpus(text) == gpus
