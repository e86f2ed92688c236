"""The known-errors catalogue against real and composed texts (tests/unit/known_errors/README.md)."""

from pathlib import Path

import pytest

from hpc_serve.node.diagnosis import CATALOGUE, diagnose, find_known
from hpc_serve.node.logs import exit_reason

CASES = sorted((Path(__file__).parent / "known_errors").glob("*.log"))


def key_of(path: Path) -> str:
    return path.name.split(".")[0]


def test_every_entry_has_a_text_and_every_text_an_entry():
    keys = [known.key for known in CATALOGUE]
    assert len(set(keys)) == len(keys)
    assert {key_of(path) for path in CASES} == set(keys)


@pytest.mark.parametrize("path", CASES, ids=lambda path: path.name)
def test_each_text_is_diagnosed_as_its_entry(path):
    hit = find_known(path.read_text().splitlines())
    assert hit is not None and hit[0].key == key_of(path), (path.name, hit and hit[0].key)
    line = hit[0].explain(hit[1])
    happened, _, change = line.partition(": ")
    assert happened and change and "{" not in line and "\n" not in line, line


def test_the_lines_name_the_values_the_log_gave(tmp_path):
    texts = {key_of(path): path.read_text().splitlines() for path in CASES}
    assert diagnose(texts["max-model-len"]) == (
        "max_model_len 100000 is more than the model allows (512 tokens: max_position_embeddings in its "
        "config.json): pass -- --max-model-len 512 or less, or leave it out")
    assert diagnose(texts["gpu-memory-taken"]).startswith(  # captured on an H200 while another process held 70 %
        "only 40.91 of 139.8 GiB of GPU memory was free when vLLM started, less than --gpu-memory-utilization "
        "0.5 asks for")
    assert "'/scratch/models/qwen-7b'" in diagnose(texts["model-missing"])
    assert diagnose(["INFO all is well", "ValueError: something else"]) is None


def test_the_first_known_error_wins_over_what_followed_it():
    lines = ["torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.",
             "RuntimeError: NCCL error: unhandled system error (run with NCCL_DEBUG=INFO for details)"]
    assert find_known(lines)[0].key == "cuda-out-of-memory"
    assert find_known(lines[::-1])[0].key == "nccl-system-error"


def test_the_failure_reason_leads_with_the_catalogue_line_and_keeps_the_root_error(tmp_path):
    log = tmp_path / "node-0.log"
    log.write_text((Path(__file__).parent / "known_errors" / "kv-cache-too-small.cpu.log").read_text())
    reason = exit_reason("vllm", "node 0 (node1)", 1, str(log)).splitlines()
    assert reason[0].startswith("vllm on node 0 (node1) exited with code 1: the KV cache cannot hold one "
                                "request of max_model_len 512")
    assert reason[1].startswith("root error: ValueError: To serve at least one request")
    assert reason[2] == "last lines of its log:"


def test_the_docs_list_every_entry():
    docs = (Path(__file__).parents[2] / "docs" / "reliability.md").read_text()
    table = docs[docs.index("## Known errors"):]
    assert [known.key for known in CATALOGUE] == [line.split("`")[1] for line in table.splitlines()
                                                   if line.startswith("| `")]
