"""What can be learnt about a model before submitting: only from a local folder, never a hub."""

from __future__ import annotations

import json
import os

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
