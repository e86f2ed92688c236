"""The typed Python API; the CLI is a thin layer over these functions.

Each function takes the options of planner/options.py as keywords (``nodes=2, tp=8, ...``); its
signature, as ``inspect.signature`` and ``help()`` show it, is generated from that table. An
option left out comes from the layers below (defaults < site file < user file < HPC_SERVE_*).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from .errors import HpcServeError
from .planner.options import OPTIONS
from .planner.settings import Settings, resolve_settings
from .planner.spec import DeploymentSpec, build_spec
from .slurm import partition_gpus_per_node

if TYPE_CHECKING:
    from .client.handle import DeploymentHandle
    from .planner.launch import LaunchPlan

_F = TypeVar("_F", bound=Callable[..., Any])


def _annotation(kind: str, default: Any) -> str:
    shown = {"list": "list[str]"}.get(kind, kind)
    return f"{shown} | None" if default is None else shown


def _options_signature(function: _F) -> _F:
    """Give ``function`` (model, /, *, profile, **options) the table's options as its signature."""
    P = inspect.Parameter
    shown = inspect.signature(function)
    params = [P("model", P.POSITIONAL_ONLY, default=None, annotation="str | None"),
              P("profile", P.KEYWORD_ONLY, default=None, annotation="str | None")]
    params += [P(o.name, P.KEYWORD_ONLY, default=o.default, annotation=_annotation(o.kind, o.default))
               for o in OPTIONS if o.name != "model"]
    function.__signature__ = shown.replace(parameters=params)  # type: ignore[attr-defined]
    return function


@_options_signature
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


@_options_signature
def plan(model: str | None = None, /, *, profile: str | None = None, **options: Any) -> LaunchPlan:
    """The launch plan (roles, GPUs, stages, exact argv per node) without submitting anything."""
    from .planner.launch import make_plan

    spec, _ = resolve(model, profile=profile, **options)
    return make_plan(spec)


@_options_signature
def render(model: str | None = None, /, *, profile: str | None = None, **options: Any) -> str:
    """The sbatch script for a deployment, as text."""
    from .job.sbatch import render_script

    spec, settings = resolve(model, profile=profile, **options)
    return render_script(spec, settings.sources)


@_options_signature
def submit(model: str | None = None, /, *, profile: str | None = None, **options: Any) -> DeploymentHandle:
    """Validate, then submit through submitit; returns the deployment (``wait_ready``, ``openai_client``).
    With ``replicas=N``: N deployments behind one router (docs/fleet.md); the group's entry is returned."""
    from .client.handle import DeploymentHandle
    from .job.submission import submit as submit_spec

    spec, settings = resolve(model, profile=profile, **options)
    if settings.values.get("replicas"):
        from .fleet.group import fleet_options, submit_group

        return DeploymentHandle.of(submit_group(spec, fleet_options(settings.values)))
    return DeploymentHandle.of(submit_spec(spec))


def deployment(key: str, /, *, home: str | None = None) -> DeploymentHandle:
    """A deployment or group already submitted, by job id or name (the newest of that name)."""
    from .client.handle import DeploymentHandle
    from .registry import Registry, registry_root

    return DeploymentHandle.of(Registry(registry_root(home)).find(key))
