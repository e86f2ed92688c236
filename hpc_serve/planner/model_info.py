"""What can be learnt about a model before submitting: from a local folder or this machine's
Hugging Face cache, never a hub."""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Mapping

from ..errors import HpcServeError

_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def _has_experts(config: dict) -> bool:
    for section in (config, config.get("text_config") or {}):
        if any((section.get(key) or 0) > 1 for key in _EXPERT_KEYS):
            return True
    return False


def check_moe(model: str) -> None:
    """Refuse --ep for a local model whose config.json has no experts; hub names pass unchecked."""
    config_path = os.path.join(os.path.expanduser(model), "config.json")
    if not os.path.isfile(config_path):
        return
    try:
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError) as exc:
        raise HpcServeError(f"Cannot read {config_path}: {exc}.",
                            "Check that the model folder is complete.") from None
    if not _has_experts(config):
        raise HpcServeError(
            f"--ep asks for expert parallelism, but {model} is not a mixture-of-experts model "
            f"(its config.json has none of {', '.join(_EXPERT_KEYS)}).",
            "Drop --ep for dense models; use --tp/--pp/--dp instead.",
        )


#: The files a model folder holds its weights in.
WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")


def weight_files(folder: str) -> list[str]:
    """The weight files in a model folder (or a hub snapshot)."""
    return [path for pattern in WEIGHTS for path in glob.glob(os.path.join(folder, pattern))]


def is_hub_id(model: str) -> bool:
    """``model`` names a Hugging Face repository (organisation/name), not a folder of this machine."""
    if model.startswith(("/", ".", "~")) or os.path.exists(model):
        return False
    return re.fullmatch(r"[\w.-]+/[\w.-]+|[\w.-]+", model) is not None


def hub_snapshot(model: str, environ: Mapping[str, str], revision: str | None = None) -> str | None:
    """The snapshot folder of ``model`` in this machine's Hugging Face cache, if any: the newest,
    or the one ``revision`` (a branch or tag the cache has a ref for, or a commit) names."""
    hub = environ.get("HF_HUB_CACHE") or os.path.join(
        environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "hub")
    repo = os.path.join(hub, f"models--{model.replace('/', '--')}")
    if revision is not None:
        try:
            with open(os.path.join(repo, "refs", revision), encoding="utf-8") as ref:
                revision = ref.read().strip()
        except OSError:
            pass  # a commit, or a revision this cache does not have
        folder = os.path.join(repo, "snapshots", revision)
        return folder if os.path.isdir(folder) else None
    snapshots = sorted(glob.glob(os.path.join(repo, "snapshots", "*")), key=os.path.getmtime)
    return snapshots[-1] if snapshots else None
