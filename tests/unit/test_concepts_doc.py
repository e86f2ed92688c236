"""docs/concepts.md keeps up with the code: the vLLM CLI, and every flag hpc-serve manages (issue 12)."""

from pathlib import Path

from hpc_serve.planner.vllm_parser import MANAGED, OPTIONS, REFUSED

DOC = (Path(__file__).resolve().parents[2] / "docs" / "concepts.md").read_text()


def test_the_deprecated_api_server_module_is_only_named_as_deprecated():
    lines = [line for line in DOC.splitlines() if "vllm.entrypoints.openai.api_server" in line]
    assert lines and all("deprecated" in line for line in lines), lines
    assert "`vllm serve`" in DOC


def test_every_managed_or_refused_flag_is_listed():
    for dest in (*MANAGED, *REFUSED):
        flags = [o.flag for o in OPTIONS.values() if o.dest == dest and o.flag.startswith("--")
                 and not o.negative]
        assert any(f"`{flag}" in DOC for flag in flags), (dest, flags)


def test_the_doc_says_which_node_gets_api_server_options():
    assert "Which flag goes to which node" in DOC
    assert "`--api-server-count`" in DOC and "headless followers" in DOC
    assert "Combinations vLLM itself refuses" in DOC
