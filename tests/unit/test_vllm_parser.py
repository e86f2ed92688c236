"""Reading pass-through words the way vLLM's parser (argparse, Python 3.11) reads them.

tests/engine/test_vllm_configs.py checks the same against vLLM's real parser; these run anywhere.
"""

import pytest

from hpc_serve.planner.vllm_parser import MANAGED, OPTIONS, REFUSED, read_args, resolve


@pytest.mark.parametrize("word,option,value", [
    ("--tensor-parallel-size", "--tensor-parallel-size", None),
    ("--tensor-parallel", "--tensor-parallel-size", None),  # a unique prefix
    ("--tensor_parallel_size=4", "--tensor-parallel-size", "4"),  # _ for -, inline value
    ("--tensor_par=4", "--tensor-parallel-size", "4"),
    ("-tp", "-tp", None), ("-t", "-tp", None),  # single-dash prefixes too
    ("-n2", "-n", "2"), ("-r=1", "-r", "1"),  # a one-letter short option with its value attached
    ("--no-enable-exp", "--no-enable-expert-parallel", None),
    ("-asc", "-asc", None), ("--api-server", "--api-server-count", None),
    ("--data-parallel-size", "--data-parallel-size", None),  # exact wins over --data-parallel-size-local
])
def test_resolve(word, option, value):
    assert resolve(word) == ((option,), value)


@pytest.mark.parametrize("word", ["--max-num-seqs", "--seed", "-O3", "-tp8", "--compilation-config.mode"])
def test_options_the_table_does_not_hold_are_left_to_vllm(word):
    assert resolve(word)[0] == ()


@pytest.mark.parametrize("word", ["--data-parallel", "-d", "--chat-temp", "--enable-"])
def test_ambiguous_abbreviations(word):
    assert len(resolve(word)[0]) > 1


def test_dotted_options_are_their_base_option():
    (arg,) = read_args(["--tensor-parallel-size.x", "3"])
    assert arg.option.flag == "--tensor-parallel-size" and arg.words == ("--tensor-parallel-size.x", "3")


def test_read_args_groups_each_option_with_its_values():
    args = read_args(["--lora-modules", "a=/a", "b=/b", "--headless", "--max-model-len", "10",
                      "--chat-template=x", "-1"])
    assert [a.words for a in args] == [("--lora-modules", "a=/a", "b=/b"), ("--headless",),
                                       ("--max-model-len", "10"), ("--chat-template=x",), ("-1",)]
    assert [a.kind for a in args] == ["api", "managed", "engine", "api", ""]
    assert args[0].value == "a=/a" and args[2].value == "10" and args[3].value == "x"


@pytest.mark.parametrize("args, value", [
    (["--max-model-len", "512"], "512"), (["--max_model_len=256"], "256"),
    (["--max-model-len", "512", "--seed", "1", "--max-model-len", "128"], "128"),  # argparse keeps the last
    (["--seed", "1"], None),
])
def test_the_value_vllm_will_read(args, value):
    from hpc_serve.planner.vllm_parser import passed_value

    assert passed_value(args, "max_model_len") == value
    assert passed_value(["--device-memory-utilization", "0.5"], "gpu_memory_utilization") == "0.5"


def test_negations_are_marked():
    assert OPTIONS["--no-enable-expert-parallel"].negative and OPTIONS["--disable-expert-parallel"].negative
    assert not OPTIONS["--enable-expert-parallel"].negative and not OPTIONS["-ep"].negative
    assert not OPTIONS["--disable-uvicorn-access-log"].negative  # a positive flag named disable-


def test_every_managed_destination_is_in_the_table():
    dests = {o.dest for o in OPTIONS.values() if o.kind == "managed"}
    assert dests == set(MANAGED) | set(REFUSED)
