"""A layout from the model: how many GPUs its weights and a useful context need, from its
config.json and the memory of one GPU, with the arithmetic shown so that the user can check it.

The estimate, per GPU of a TP x PP group:

    weights   parameters x bytes per parameter (the dtype, or the quantization in the config),
              counted from the config's shapes (dense, mixture-of-experts, DeepSeek's MLA), / (TP x PP)
    budget    GPU memory x vLLM's --gpu-memory-utilization (0.9) - the weights - a headroom for
              activations, CUDA graphs and NCCL buffers
    KV cache  bytes per token: layers x 2 (K and V) x KV heads x head size x 2 bytes, split over
              TP while TP <= KV heads (MLA: one latent of kv_lora_rank + rope size per layer, on
              every TP rank), / PP

The smallest TP that fits in one node (TP must divide the attention heads, and the KV heads or
be a multiple of them) wins; when a whole node is not enough, PP across nodes. The fit asks room
for ``MIN_CONTEXTS`` full contexts of the length asked for (``--max-model-len``, else the
model's own, at most ``DEFAULT_CONTEXT``). Pure, stdlib only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ..errors import HpcServeError

GIB = 1 << 30
#: vLLM's default share of GPU memory, and what we keep for activations, CUDA graphs and NCCL.
GPU_MEMORY_UTILIZATION, HEADROOM_GIB = 0.9, 2.0
#: How many full contexts the KV cache must hold at least, and the context asked for by default.
MIN_CONTEXTS, DEFAULT_CONTEXT = 4, 32768
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "fp8": 1}
#: Quantization methods whose linear weights take one byte, and those that take half (4-bit).
BYTE_METHODS = ("fp8", "fbgemm_fp8", "modelopt", "compressed-tensors-fp8")
NIBBLE_METHODS = ("awq", "gptq", "awq_marlin", "gptq_marlin", "bitsandbytes", "mxfp4")


@dataclass(frozen=True)
class ModelSize:
    """What the estimate reads from a config: parameters (in the linear layers and the rest),
    bytes per linear weight, KV bytes per token per layer, heads, layers, context."""

    linear_params: int
    other_params: int
    linear_bytes: float
    other_bytes: float
    layers: int
    heads: int
    kv_heads: int  # 0: MLA (one latent, replicated over TP)
    kv_bytes_per_layer: int  # per token, on one GPU when not split over TP
    max_context: int
    experts: int = 0
    how: str = ""

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params

    @property
    def weight_bytes(self) -> float:
        return self.linear_params * self.linear_bytes + self.other_params * self.other_bytes


@dataclass(frozen=True)
class Suggestion:
    """The layout picked and the arithmetic that picked it (one line per step)."""

    tp: int
    pp: int
    nodes: int
    context: int
    kv_tokens: int
    lines: tuple[str, ...] = field(default=())


def _text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    return config.get("text_config") or config


def linear_bytes(config: Mapping[str, Any]) -> tuple[float, float, str]:
    """(bytes per linear weight, bytes per other weight, how) from the dtype and quantization."""
    text = _text_config(config)
    dtype = str(config.get("torch_dtype") or text.get("torch_dtype") or config.get("dtype") or "bfloat16")
    other = DTYPE_BYTES.get(dtype.replace("torch.", ""), 2)
    quant = config.get("quantization_config") or {}
    method = str(quant.get("quant_method") or "").lower()
    if method in NIBBLE_METHODS or quant.get("bits") == 4 or quant.get("load_in_4bit"):
        return 0.5 + 1 / 64, other, f"{method or '4-bit'} (4-bit weights, scales per group of 128)"
    fmt = str(quant.get("fmt") or quant.get("format") or "").lower()
    groups = quant.get("config_groups") or {}
    bits = {g.get("weights", {}).get("num_bits") for g in groups.values() if isinstance(g, dict)}
    if method in BYTE_METHODS or "e4m3" in fmt or bits == {8}:
        return 1.0, other, f"{method} (8-bit weights)"
    if bits == {4}:
        return 0.5 + 1 / 64, other, f"{method} (4-bit weights)"
    return float(other), float(other), f"{dtype} ({other} bytes a weight)"


def model_size(config: Mapping[str, Any]) -> ModelSize:
    """Count a decoder's parameters and KV cache from its config (dense, MoE, or MLA)."""
    c = _text_config(config)
    hidden, layers = int(c["hidden_size"]), int(c["num_hidden_layers"])
    heads = int(c["num_attention_heads"])
    vocab = int(c["vocab_size"])
    head_dim = int(c.get("head_dim") or hidden // heads)
    kv_heads = int(c.get("num_key_value_heads") or heads)
    embed = vocab * hidden * (1 if c.get("tie_word_embeddings") else 2)
    if c.get("kv_lora_rank"):  # DeepSeek's multi-head latent attention
        rope, nope, v_dim = int(c["qk_rope_head_dim"]), int(c["qk_nope_head_dim"]), int(c["v_head_dim"])
        lora, q_lora = int(c["kv_lora_rank"]), int(c.get("q_lora_rank") or 0)
        q = hidden * q_lora + q_lora * heads * (nope + rope) if q_lora else hidden * heads * (nope + rope)
        attention = q + hidden * (lora + rope) + lora * heads * (nope + v_dim) + heads * v_dim * hidden
        kv_per_layer, kv_heads = (lora + rope) * 2, 0
    else:
        attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
        kv_per_layer = 2 * kv_heads * head_dim * 2
    experts = int(c.get("num_local_experts") or c.get("n_routed_experts") or c.get("num_experts") or 0)
    dense_mlp = 3 * hidden * int(c["intermediate_size"])
    if experts:
        expert_size = int(c.get("moe_intermediate_size") or c["intermediate_size"])
        shared = int(c.get("n_shared_experts") or 0)
        moe_mlp = 3 * hidden * expert_size * (experts + shared) + hidden * experts
        dense_layers = int(c.get("first_k_dense_replace") or 0)
        mlp = dense_layers * dense_mlp + (layers - dense_layers) * moe_mlp
    else:
        mlp = layers * dense_mlp
    linear, per_linear_other, how = linear_bytes(config)
    return ModelSize(linear_params=layers * attention + mlp, other_params=embed + layers * 2 * hidden,
                     linear_bytes=linear, other_bytes=per_linear_other, layers=layers, heads=heads,
                     kv_heads=kv_heads, kv_bytes_per_layer=kv_per_layer,
                     max_context=int(c.get("max_position_embeddings") or DEFAULT_CONTEXT), experts=experts, how=how)


def tp_choices(size: ModelSize, gpus_per_node: int) -> list[int]:
    """The TP sizes vLLM accepts for this model inside one node, smallest first."""
    choices = []
    for tp in range(1, gpus_per_node + 1):
        if gpus_per_node % tp or size.heads % tp:
            continue
        if size.kv_heads and size.kv_heads % tp and tp % size.kv_heads:
            continue
        choices.append(tp)
    return choices


def kv_bytes_per_token(size: ModelSize, tp: int, pp: int) -> float:
    """One token's KV cache on one GPU of a TP x PP group."""
    if size.kv_heads == 0:  # MLA: every TP rank holds the whole latent
        split = 1
    else:
        split = min(tp, size.kv_heads)
    return size.layers * size.kv_bytes_per_layer / split / pp


def suggest_layout(config: Mapping[str, Any], gpu_memory_gib: float, gpus_per_node: int,
                   max_nodes: int | None = None, context: int | None = None, pp: int | None = None,
                   share: float = GPU_MEMORY_UTILIZATION) -> Suggestion:
    """The smallest layout that holds the weights and ``MIN_CONTEXTS`` contexts; HpcServeError
    naming what would fit when none does within ``max_nodes`` (default: up to 64 nodes). ``pp``:
    the user's PP, kept; ``share``: the --gpu-memory-utilization vLLM will use."""
    size = model_size(config)
    context = min(context or min(size.max_context, DEFAULT_CONTEXT), size.max_context)
    usable = gpu_memory_gib * share - HEADROOM_GIB
    lines = [f"parameters: {size.params / 1e9:.1f} B" + (f" ({size.experts} experts)" if size.experts else "") +
             f", weights {size.how}: {size.weight_bytes / GIB:.1f} GiB",
             f"per GPU: {gpu_memory_gib:g} GiB x {share:g} - {HEADROOM_GIB:g} GiB headroom "
             f"= {usable:.1f} GiB for weights and KV cache",
             f"KV cache: {size.layers * size.kv_bytes_per_layer / 1024:.0f} KiB a token" +
             (" (MLA latent, on every TP rank)" if size.kv_heads == 0 else f" ({size.kv_heads} KV heads)") +
             f"; wanted: {MIN_CONTEXTS} contexts of {context} tokens"]
    choices = tp_choices(size, gpus_per_node) or [1]
    most_nodes = max_nodes or 64
    # one node: the smallest TP; more: a whole node's TP, PP stages filling whole nodes
    candidates = [(tp, 1) for tp in choices]
    candidates += [(choices[-1], stages) for stages in range(2, size.layers + 1)
                   if choices[-1] * stages % gpus_per_node == 0 and choices[-1] * stages // gpus_per_node <= most_nodes]
    if pp is not None:
        candidates = [(tp, pp) for tp in choices]
    for tp, stages in candidates:
        weights = size.weight_bytes / (tp * stages) / GIB
        free = usable - weights
        tokens = int(free * GIB / kv_bytes_per_token(size, tp, stages)) if free > 0 else 0
        nodes = max(1, tp * stages // gpus_per_node)
        verdict = "fits" if tokens >= MIN_CONTEXTS * context else "too small"
        lines.append(f"TP {tp} x PP {stages}: weights {weights:.1f} GiB a GPU, " +
                     (f"{free:.1f} GiB left: {tokens} tokens of KV cache: {verdict}" if free > 0 else
                      f"more than the {usable:.1f} GiB: too small"))
        if verdict == "fits":
            return Suggestion(tp, stages, nodes, context, tokens, tuple(lines))
    problem = (f"{size.params / 1e9:.0f} B parameters ({size.weight_bytes / GIB:.0f} GiB of weights) do not fit "
               f"{most_nodes} node(s) of {gpus_per_node} x {gpu_memory_gib:g} GiB GPUs with {MIN_CONTEXTS} "
               f"contexts of {context} tokens.")
    if max_nodes is not None:
        try:
            wider = suggest_layout(config, gpu_memory_gib, gpus_per_node, None, context, pp, share)
        except HpcServeError:
            pass
        else:
            raise HpcServeError(problem, f"It fits --nodes {wider.nodes} (TP {wider.tp} x PP {wider.pp}); or use "
                                         "a quantized checkpoint (FP8 halves the weights), or a shorter "
                                         "-- --max-model-len.")
    raise HpcServeError(problem, f"The weights alone need about {size.weight_bytes / GIB / usable:.0f} such GPUs: "
                                 "use a quantized checkpoint (FP8 halves them), or a shorter -- --max-model-len.")


def context_asked(vllm_args: Sequence[str]) -> int | None:
    """The --max-model-len passed to vLLM, if any."""
    from .vllm_parser import passed_value

    value = passed_value(list(vllm_args), "max_model_len")
    return int(value) if value and value.isdigit() else None


def share_asked(vllm_args: Sequence[str]) -> float:
    """The --gpu-memory-utilization passed to vLLM (as vLLM reads it), else vLLM's 0.9."""
    from .vllm_parser import passed_value

    value = passed_value(list(vllm_args), "gpu_memory_utilization")
    try:
        return float(value) if value is not None else GPU_MEMORY_UTILIZATION
    except ValueError:
        return GPU_MEMORY_UTILIZATION


def auto_layout(values: dict[str, Any], sources: dict[str, str]) -> tuple[str, ...]:
    """``--tp auto``: set tp, pp (unless given) and nodes (unless given) from the model's config
    and ``gpu_memory``, in place; the arithmetic, one line a step."""
    if not values.get("gpu_memory"):
        raise HpcServeError("--tp auto needs the memory of one GPU.",
                            "Give --gpu-memory GIB (e.g. --gpu-memory 80), or gpu_memory in your profile.")
    model = str(values.get("model") or "")
    suggestion = suggest_layout(read_config(model), float(values["gpu_memory"]), int(values["gpus_per_node"]),
                                max_nodes=values.get("nodes"), context=context_asked(values.get("vllm_args") or ()),
                                pp=values.get("pp"), share=share_asked(values.get("vllm_args") or ()))
    how = f"auto: from {model}'s config.json and {values['gpu_memory']} GiB a GPU"
    values["tp"], sources["tp"] = suggestion.tp, how
    if values.get("pp") is None:
        values["pp"], sources["pp"] = suggestion.pp, how
    if values.get("nodes") is None:
        values["nodes"], sources["nodes"] = suggestion.nodes, how
    return (*suggestion.lines, f"layout: --tp {suggestion.tp} --pp {suggestion.pp} on {suggestion.nodes} node(s) "
            f"of {values['gpus_per_node']} GPUs, room for {suggestion.kv_tokens} tokens of KV cache")


def read_config(model: str) -> dict[str, Any]:
    """The model's config.json: a local folder's, else the Hugging Face cache's on this machine."""
    from .model_info import hub_snapshot

    folder = os.path.expanduser(model) if os.path.isdir(os.path.expanduser(model)) else hub_snapshot(model, os.environ)
    path = os.path.join(folder or "", "config.json")
    if not folder or not os.path.isfile(path):
        raise HpcServeError(f"No config.json for {model} here: --tp auto reads the model's shapes.",
                            "Pass the model's folder, or download it into the Hugging Face cache first.")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as exc:
        raise HpcServeError(f"Cannot read {path}: {exc}.", "Check that the model folder is complete.") from None
