"""The typed Python API; the CLI is a thin layer over these functions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import HpcServeError
from .planner.settings import Settings, resolve_settings
from .slurm import partition_gpus_per_node
from .planner.spec import DeploymentSpec, build_spec

if TYPE_CHECKING:
    from .client.handle import DeploymentHandle
    from .planner.launch import LaunchPlan


def resolve(model: str | None = None, /, *, profile: str | None = None,
            **options: Any) -> tuple[DeploymentSpec, Settings]:
    """Settings from every layer, then a validated spec. Options are the config keys."""
    if model is not None:
        if options.get("model") not in (None, model):
            raise HpcServeError(f"Two models given: {model!r} and --model {options['model']!r}.",
                                "Give the model once.")
        options["model"] = model
    probe = partition_gpus_per_node if options.get("executor", "slurm") != "local" else None
    settings = resolve_settings(options, profile=profile, gpus_probe=probe)
    return build_spec(**settings.values), settings


def plan(model: str | None = None, /, *, profile: str | None = None, **options: Any) -> LaunchPlan:
    """The launch plan (roles, GPUs, stages, exact argv per node) without submitting anything."""
    from .planner.launch import make_plan

    spec, _ = resolve(model, profile=profile, **options)
    return make_plan(spec)


def render(model: str | None = None, /, *, profile: str | None = None, **options: Any) -> str:
    """The sbatch script for a deployment, as text."""
    from .job.sbatch import render_script

    spec, settings = resolve(model, profile=profile, **options)
    return render_script(spec, settings.sources)


def submit(model: str | None = None, /, *, profile: str | None = None, **options: Any) -> DeploymentHandle:
    """Validate, then submit through submitit; returns the deployment (``wait_ready``, ``openai_client``)."""
    from .client.handle import DeploymentHandle
    from .job.submission import submit as submit_spec

    spec, _ = resolve(model, profile=profile, **options)
    return DeploymentHandle.of(submit_spec(spec))
