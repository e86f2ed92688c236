"""A deployment as the Python API hands it out: its registry folder plus waiting and an OpenAI client."""

from __future__ import annotations

from typing import Any, Callable

from ..errors import HpcServeError
from ..registry import Deployment


class DeploymentHandle(Deployment):
    """What ``hpc_serve.submit`` returns: a registry entry you can wait on and talk to."""

    @classmethod
    def of(cls, dep: Deployment) -> "DeploymentHandle":
        return cls(dep.root, dep.id)

    def wait_ready(self, timeout_s: float | None = None, on_update: Callable[[Any], None] | None = None):
        """Block until READY (see hpc_serve.client.waiting.wait_ready); returns a DeploymentStatus."""
        from .waiting import wait_ready

        return wait_ready(self, timeout_s=timeout_s, on_update=on_update)

    def openai_client(self, **kwargs: Any):
        """An ``openai.OpenAI`` client for the endpoint (pip install 'hpc-serve[openai]')."""
        try:
            import openai
        except ImportError:
            raise HpcServeError("The openai package is not installed.",
                                "pip install 'hpc-serve[openai]' (or pip install openai).") from None
        if not self.endpoint:
            raise HpcServeError(f"Deployment {self.id} has no endpoint yet ({self.phase}).",
                                "Call wait_ready() first.")
        return openai.OpenAI(base_url=self.endpoint["url"], api_key=self.api_key or "none", **kwargs)
