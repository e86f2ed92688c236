"""Rendering the Jinja sbatch templates. Login-node side (needs jinja2)."""

from __future__ import annotations

import os
import shlex
from functools import lru_cache

from ..version import __version__
from ..errors import HpcServeError
from ..node.args import node_command
from ..planner.spec import DeploymentSpec
from .request import slurm_request

_PACKAGE = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))  # hpc_serve/
#: Where the node agent's package is bound inside a container.
CONTAINER_PKG = "/opt/hpc-serve-pkg"


def templates_dir() -> str:
    """The templates shipped in the wheel, or the repository's top-level templates/."""
    for candidate in (os.path.join(_PACKAGE, "templates"),
                      os.path.join(os.path.dirname(_PACKAGE), "templates")):
        if os.path.isfile(os.path.join(candidate, "job.sbatch.j2")):
            return candidate
    raise HpcServeError("hpc-serve's templates are missing from the installation.",
                        "Reinstall hpc-serve (pip install --force-reinstall hpc-serve).")


def _bytecode_cache():
    """Compiled templates cached per user: rendering then skips Jinja's compiler (~50 ms)."""
    import jinja2

    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = os.path.join(base, "hpc-serve", f"jinja-{__version__}")
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
    except OSError:
        return None  # read-only home: render uncached
    return jinja2.FileSystemBytecodeCache(folder)


@lru_cache(maxsize=1)
def _environment():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(templates_dir()),
        bytecode_cache=_bytecode_cache(),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.filters["sh"] = lambda value: shlex.quote(str(value))
    return env


def render_template(name: str, **context: object) -> str:
    """Render one template (or partial) with StrictUndefined and the quoting filters."""
    return _environment().get_template(name).render(**context)


def render_script(spec: DeploymentSpec, sources: dict[str, str] | None = None,
                  command: str | None = None) -> str:
    """The complete sbatch script of ``spec``; ``command`` is the hpc-serve line that made it."""
    container_kind = None
    if spec.container:
        container_kind = "apptainer" if spec.container.endswith(".sif") else "pyxis"
    return render_template(
        "job.sbatch.j2",
        spec=spec,
        layout=spec.layout,
        request=slurm_request(spec),
        version=__version__,
        node_command=node_command(spec),
        container_kind=container_kind,
        container_pkg=CONTAINER_PKG,
        package_parent=os.path.dirname(_PACKAGE),
        gpus_source=(sources or {}).get("gpus_per_node", "given"),
        command=command,
    )
