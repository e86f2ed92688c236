"""A layout from the model (`--tp auto`, `plan --suggest`) on the real config.json of well-known
models, against the layouts their model cards and vLLM's documentation give."""

import json
import shutil
from pathlib import Path

import pytest

from hpc_serve.errors import HpcServeError
from hpc_serve.planner.settings import resolve_settings
from hpc_serve.planner.sizing import context_asked, linear_bytes, model_size, suggest_layout

from .test_cli import run

CONFIGS = Path(__file__).resolve().parent / "model_configs"


def config(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


@pytest.mark.parametrize("name, billions", [
    ("qwen2.5-7b", 7.6), ("qwen2.5-72b", 72.7), ("llama-3.1-405b", 405.9), ("mixtral-8x22b", 140.6),
    ("deepseek-v3", 671.0),  # without the multi-token-prediction layer (vLLM loads it only for speculation)
])
def test_parameters_are_counted_from_the_shapes_as_the_model_cards_give_them(name, billions):
    assert model_size(config(name)).params / 1e9 == pytest.approx(billions, rel=0.005)


@pytest.mark.parametrize("name, gib, layout", [
    ("qwen2.5-7b", 80, (1, 1, 1)),  # one GPU (Qwen's vLLM guide)
    ("qwen2.5-72b", 80, (4, 1, 1)),  # --tensor-parallel-size 4 (Qwen's vLLM guide)
    ("llama-3.1-405b", 80, (8, 2, 2)),  # BF16: TP 8 x PP 2 on two 8 x H100 nodes (vLLM's Llama 3.1 post)
    ("llama-3.1-405b", 141, (8, 1, 1)),  # BF16 fits one 8 x H200 node (the same post)
    ("deepseek-v3", 141, (8, 1, 1)),  # FP8 on one 8 x H200 node (vLLM's DeepSeek-V3 recipe)
    ("deepseek-v3", 80, (8, 2, 2)),  # two 8 x H100 nodes (SGLang's and the model card's guidance)
    ("mixtral-8x22b", 80, (8, 1, 1)),  # 262 GiB: 4 x 80 GB hold the weights with 4.5 GiB a GPU left
])
def test_the_smallest_layout_that_holds_the_model_and_a_useful_context(name, gib, layout):
    suggestion = suggest_layout(config(name), gib, 8)
    assert (suggestion.tp, suggestion.pp, suggestion.nodes) == layout, suggestion.lines
    assert suggestion.lines[-1].startswith(f"TP {layout[0]} x PP {layout[1]}: ")
    assert suggestion.lines[-1].endswith(": fits") and suggestion.kv_tokens >= 4 * 32768


def test_the_arithmetic_is_shown_step_by_step():
    lines = suggest_layout(config("qwen2.5-72b"), 80, 8).lines
    assert lines[0] == "parameters: 72.7 B, weights bfloat16 (2 bytes a weight): 135.4 GiB"
    assert lines[1] == "per GPU: 80 GiB x 0.9 - 2 GiB headroom = 70.0 GiB for weights and KV cache"
    assert lines[2] == "KV cache: 320 KiB a token (8 KV heads); wanted: 4 contexts of 32768 tokens"
    assert lines[3] == "TP 1 x PP 1: weights 135.4 GiB a GPU, more than the 70.0 GiB: too small"
    assert lines[4].startswith("TP 2 x PP 1: weights 67.7 GiB a GPU, 2.3 GiB left: ")
    assert lines[5].startswith("TP 4 x PP 1: weights 33.9 GiB a GPU, 36.1 GiB left: ") and lines[5].endswith("fits")


def test_deepseeks_latent_kv_cache_is_held_by_every_tp_rank_and_its_fp8_weights_take_a_byte():
    size = model_size(config("deepseek-v3"))
    assert size.kv_heads == 0 and size.kv_bytes_per_layer == (512 + 64) * 2
    assert linear_bytes(config("deepseek-v3"))[:2] == (1.0, 2.0)
    assert "(MLA latent, on every TP rank)" in suggest_layout(config("deepseek-v3"), 141, 8).lines[2]


def test_tp_divides_the_heads():
    small = {**config("qwen2.5-7b"), "num_attention_heads": 28, "num_key_value_heads": 4}
    suggestion = suggest_layout(small, 8, 8)  # 14 GiB of weights on 8 GiB GPUs: TP 8 is not allowed (28 heads)
    assert all(not line.startswith("TP 8 x PP 1") for line in suggestion.lines)
    assert (suggestion.tp, suggestion.pp) == (4, 2)


def test_what_cannot_fit_says_what_would():
    with pytest.raises(HpcServeError) as caught:
        suggest_layout(config("llama-3.1-405b"), 80, 8, max_nodes=1)
    assert caught.value.problem == ("406 B parameters (756 GiB of weights) do not fit 1 node(s) of 8 x 80 GiB GPUs "
                                    "with 4 contexts of 32768 tokens.")
    assert caught.value.hint.startswith("It fits --nodes 2 (TP 8 x PP 2);")
    with pytest.raises(HpcServeError) as caught:
        suggest_layout(config("llama-3.1-405b"), 80, 1, max_nodes=1)  # one 80 GB GPU
    assert caught.value.hint.startswith("It fits --nodes ") or "such GPUs" in caught.value.hint


def test_a_shorter_context_asked_of_vllm_is_what_the_fit_counts():
    assert context_asked(["--max-model-len", "4096", "--enforce-eager"]) == 4096
    assert context_asked(["--max-model-len=8192"]) == 8192 and context_asked([]) is None
    short = suggest_layout(config("qwen2.5-72b"), 80, 8, context=1024)
    assert (short.tp, short.context) == (2, 1024)  # 2.3 GiB left a GPU hold 4 x 1024 tokens


def test_a_lower_gpu_memory_share_asked_of_vllm_is_what_the_fit_counts():
    from hpc_serve.planner.sizing import share_asked

    assert share_asked(["--gpu_memory_utilization", "0.5"]) == 0.5 and share_asked([]) == 0.9
    full, half = suggest_layout(config("qwen2.5-7b"), 24, 8), suggest_layout(config("qwen2.5-7b"), 24, 8, share=0.5)
    assert half.tp > full.tp and any("24 GiB x 0.5 - 2 GiB headroom = 10.0 GiB" in line for line in half.lines)


@pytest.fixture
def model_folder(tmp_path):
    folder = tmp_path / "Llama-3.1-405B"
    folder.mkdir()
    shutil.copy(CONFIGS / "llama-3.1-405b.json", folder / "config.json")
    return folder


def test_tp_auto_in_the_settings_sets_tp_pp_and_nodes_and_keeps_what_the_user_gave(model_folder):
    settings = resolve_settings({"model": str(model_folder), "tp": "auto", "gpu_memory": 80, "gpus_per_node": 8},
                                environ={})
    assert (settings.values["tp"], settings.values["pp"], settings.values["nodes"]) == (8, 2, 2)
    assert settings.sources["tp"] == f"auto: from {model_folder}'s config.json and 80 GiB a GPU"
    assert settings.sizing[-1] == ("layout: --tp 8 --pp 2 on 2 node(s) of 8 GPUs, room for 757386 tokens of "
                                   "KV cache")
    wider = resolve_settings({"model": str(model_folder), "tp": "auto", "gpu_memory": 141, "gpus_per_node": 8,
                              "nodes": 3}, environ={})
    assert (wider.values["tp"], wider.values["pp"], wider.values["nodes"]) == (8, 1, 3)  # DP 3 for the rest
    from_env = resolve_settings({"model": str(model_folder), "gpus_per_node": 8},
                                environ={"HPC_SERVE_TP": "auto", "HPC_SERVE_GPU_MEMORY": "141"})
    assert from_env.values["tp"] == 8


def test_plan_suggest_prints_the_arithmetic_and_the_plan(model_folder):
    done = run("plan", str(model_folder), "--suggest", "--gpu-memory", "80", "--gpus-per-node", "8")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "--tp auto, from the model's config.json:"
    assert "  TP 8 x PP 2: weights 47.2 GiB a GPU, 22.8 GiB left: 757386 tokens of KV cache: fits" in lines
    assert "2 node(s) x 8 GPUs, tp=8 pp=2 dp=1" in done.stdout
    as_json = json.loads(run("plan", str(model_folder), "--tp", "auto", "--gpu-memory", "80", "--gpus-per-node",
                             "8", "--json").stdout)
    assert as_json["sizing"][-1].startswith("layout: --tp 8 --pp 2 on 2 node(s)")


def test_tp_auto_without_what_it_needs_is_refused_before_slurm(model_folder, tmp_path):
    done = run("submit", str(model_folder), "--tp", "auto", "--gpus-per-node", "8", "--no-wait")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == ("error: --tp auto needs the memory of one GPU.\n"
                           "Give --gpu-memory GIB (e.g. --gpu-memory 80), or gpu_memory in your profile.\n")
    missing = run("render", str(tmp_path / "nowhere"), "--tp", "auto", "--gpu-memory", "80", "--gpus-per-node", "8")
    assert missing.returncode == 2 and missing.stderr.startswith(f"error: No config.json for {tmp_path / 'nowhere'}")
    big = run("submit", str(model_folder), "--tp", "auto", "--gpu-memory", "80", "--gpus-per-node", "8",
              "--nodes", "1", "--no-wait")
    assert big.returncode == 2 and "It fits --nodes 2 (TP 8 x PP 2)" in big.stderr, big.stderr
