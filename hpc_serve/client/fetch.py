"""`hpc-serve fetch`: a model from the Hugging Face hub into the cache the jobs read, before the job.

Run on a login or transfer node (compute nodes are often offline). The download is
huggingface_hub's own (`snapshot_download`: resumable, its progress bars, its token: HF_TOKEN or
the token file `hf auth login` wrote, never printed here); hpc-serve picks the cache folder, skips
weight formats vLLM does not load, and turns the hub's refusals into what to do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import HpcServeError

#: Files vLLM does not load from a hub repository (other frameworks' weights, duplicate originals).
SKIPPED = ("original/*", "*.pth", "*.gguf", "*.onnx", "*.onnx_data", "*.msgpack", "*.h5", "*.ot", "*.tflite")
PIP_HINT = "pip install 'hpc-serve[fetch]' (or pip install huggingface_hub)"


@dataclass(frozen=True)
class Fetched:
    """Where the model now is: its snapshot folder and the cache (HF_HOME) it lies in."""

    model: str
    revision: str | None
    folder: str
    hf_home: str | None


def hub_cache(hf_home: str | None) -> str | None:
    """The hub cache folder inside ``hf_home`` (None: huggingface_hub's default, HF_HOME's)."""
    return os.path.join(os.path.expanduser(hf_home), "hub") if hf_home else None


def fetch(model: str, hf_home: str | None = None, revision: str | None = None, all_files: bool = False) -> Fetched:
    """Download ``model`` (a hub id) into ``hf_home``'s cache, or find it there; return its folder."""
    if os.path.isdir(os.path.expanduser(model)):
        raise HpcServeError(f"{model} is a local folder: there is nothing to fetch.",
                            f"Serve it as it is: hpc-serve submit {model} ...")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError,
                                            LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError:
        raise HpcServeError("huggingface_hub is not installed: `hpc-serve fetch` downloads with it.",
                            PIP_HINT) from None
    where = hf_home or os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
    try:
        folder = snapshot_download(model, revision=revision, cache_dir=hub_cache(hf_home),
                                   ignore_patterns=None if all_files else list(SKIPPED))
    except HFValidationError:
        raise HpcServeError(f"{model!r} is neither a local folder nor a Hugging Face model id.",
                            "Give organisation/model, e.g. Qwen/Qwen2.5-7B-Instruct.") from None
    except GatedRepoError:
        raise HpcServeError(
            f"{model} is gated on Hugging Face and this machine's token has no access to it (or there is no token).",
            f"Accept its terms at https://huggingface.co/{model}, then log in (`hf auth login`) or export "
            "HF_TOKEN, and fetch again.") from None
    except RevisionNotFoundError:
        raise HpcServeError(f"{model} has no revision {revision!r}.", "Give a branch, tag or commit it has.") from None
    except RepositoryNotFoundError:
        raise HpcServeError(f"There is no model {model!r} on Hugging Face (or it is private to others).",
                            "Check the name (organisation/model), or log in if it is yours.") from None
    except LocalEntryNotFoundError:
        raise HpcServeError(f"{model} is not in the cache at {where}, and the hub cannot be reached from here "
                            "(offline, or HF_HUB_OFFLINE is set).",
                            "Run hpc-serve fetch on a node that reaches huggingface.co (a login or transfer "
                            "node).") from None
    except HfHubHTTPError as exc:
        raise HpcServeError(f"The hub refused to send {model}: {str(exc).splitlines()[0]}",
                            "Try again later; downloads resume where they stopped.") from None
    except OSError as exc:
        if exc.errno is None:  # a network error that is an OSError (older huggingface_hub: requests)
            raise HpcServeError(f"Downloading {model} failed: {str(exc).splitlines()[0]}",
                                "Run it again: the download resumes; behind a proxy, check HTTPS_PROXY.") from None
        raise HpcServeError(f"Cannot write {model} into {where}: {exc.strerror or exc}.",
                            "Choose a writable folder with room for the weights (--hf-home).") from None
    except Exception as exc:  # noqa: BLE001 - the HTTP client's own errors (proxy, timeouts, a cut connection)
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise HpcServeError(f"Downloading {model} failed: {type(exc).__name__}: {first}",
                            "Run it again: the download resumes; behind a proxy, check HTTPS_PROXY.") from None
    return Fetched(model, revision, folder, hf_home)
