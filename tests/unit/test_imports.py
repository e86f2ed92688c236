"""The package layout holds: imports point down the data path, no cycles, the node side is stdlib only."""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "hpc_serve"
#: What each part may import of hpc_serve (besides itself); see docs/development.md, "Layout of the code".
ALLOWED = {
    "errors": set(), "version": set(), "vllm_auth": set(),
    "registry": {"errors"}, "slurm": {"errors"},
    "planner": {"errors", "vllm_auth"},  # vllm_args names the middleware
    "node": {"errors", "planner", "registry", "slurm", "vllm_auth"},
    "job": {"errors", "version", "planner", "registry", "slurm", "node", "fleet"},  # fleet: the router's task
    "client": {"errors", "planner", "registry", "slurm"},
    "fleet": {"errors", "planner", "registry", "slurm", "node", "job", "client"},
}
NODE_SIDE = ("planner", "node", "registry", "slurm", "errors", "vllm_auth", "fleet")
#: Imports inside a function that runs only where the package is present.
GUARDED = {"node.agent": {"submitit"},  # run_task: the function a submitit job runs
           "planner.settings": {"tomli"},  # Python < 3.11 only, in place of tomllib
           "planner.vllm_parser": {"vllm"}}  # derive(): the engine test reads the installed vLLM


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path) -> tuple[set[str], set[str]]:
    """(hpc_serve modules, other top-level packages) that module ``name`` imports, lazily or not."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    ours, theirs = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - node.level + 1] if node.level > 1 else package
            target = ".".join([*base, *([node.module] if node.module else [])])
            for alias in node.names:
                full = f"{target}.{alias.name}".strip(".")
                ours.add(full if full in MODULES else target)
        elif isinstance(node, ast.ImportFrom):
            theirs.add((node.module or "").split(".")[0])
        elif isinstance(node, ast.Import):
            theirs.update(alias.name.split(".")[0] for alias in node.names)
    return {m for m in ours if m != name}, theirs - {"__future__", "hpc_serve"}


MODULES = _modules()
GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _part(module: str) -> str:
    return module.split(".")[0] if module else ""


@pytest.mark.parametrize("name", sorted(m for m in MODULES if _part(m) in ALLOWED))
def test_imports_point_down_the_data_path(name):
    wrong = {m for m in GRAPH[name][0] if _part(m) != _part(name) and _part(m) not in ALLOWED[_part(name)]}
    assert not wrong, f"hpc_serve.{name} imports {sorted(wrong)} (see docs/development.md)"


@pytest.mark.parametrize("name", sorted(m for m in MODULES if _part(m) in NODE_SIDE))
def test_the_node_side_imports_only_the_standard_library(name):
    third_party = {m for m in GRAPH[name][1] if m and m not in sys.stdlib_module_names} - GUARDED.get(name, set())
    assert not third_party, f"hpc_serve.{name} imports {sorted(third_party)}"


def test_no_import_cycles():
    def visit(module, path):
        for target in GRAPH.get(module, ((), ()))[0]:
            if target in path:
                cycle = path[path.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            visit(target, path + [target])

    for module in MODULES:
        visit(module, [module])
