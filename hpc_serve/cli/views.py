"""What the CLI shows: each kind of output written once, here.

Plain lines go to stdout (results) or stderr (progress, warnings); rich is imported only by the
views that draw tables (`plan`, `smoke`, `config show`), so `--help`, `status` and `render` stay light.
"""

from __future__ import annotations

import contextlib
import shlex
import sys
from typing import TYPE_CHECKING, Any, Callable, Iterable

if TYPE_CHECKING:
    from ..client.control import DeploymentStatus
    from ..planner.launch import LaunchPlan
    from ..planner.settings import Settings
    from ..registry import Deployment

#: The local port the READY block's ssh command forwards (`hpc-serve tunnel` picks a free one).
LAPTOP_PORT = 8000


def console(stderr: bool = False):
    """A rich console without syntax highlighting."""
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def warn(messages: Iterable[str]) -> None:
    """One ``warning:`` line on stderr per message."""
    for message in messages:
        print(f"warning: {message}", file=sys.stderr)


def show_sizing(lines: Iterable[str], brief: bool = False) -> None:
    """The arithmetic of --tp auto: every step on stdout (plan), or the layout it chose on stderr."""
    lines = list(lines)
    if lines and brief:
        print(f"--tp auto: {lines[-1]} (hpc-serve plan --suggest shows the arithmetic)", file=sys.stderr)
    elif lines:
        print("--tp auto, from the model's config.json:")
        print("\n".join(f"  {line}" for line in lines) + "\n")


# --- connecting: the endpoint, the exports an OpenAI client reads, the tunnel ---------------

def export_lines(url: str, api_key_file: str | None) -> list[str]:
    """The shell exports for OpenAI clients: the base URL, and the key read from its file."""
    lines = [f"export OPENAI_BASE_URL={shlex.quote(url)}"]
    if api_key_file:
        lines.append(f'export OPENAI_API_KEY="$(cat {shlex.quote(api_key_file)})"')
    return lines


def ready_lines(dep_id: str, endpoint: dict[str, Any], via: str) -> list[str]:
    """The READY block: the endpoint, an ssh tunnel for a laptop, its exports, `hpc-serve tunnel`."""
    exports = export_lines(f"http://127.0.0.1:{LAPTOP_PORT}/v1", endpoint.get("api_key_file"))
    if len(exports) == 1:
        exports.append("(no API key: started with --no-api-key)")
    return [f"READY: {endpoint['url']}  (model {endpoint['served_model']}, on {endpoint['hostname']})",
            f"from your laptop: ssh -N -L 127.0.0.1:{LAPTOP_PORT}:{endpoint['host']}:{endpoint['port']} {via}",
            *(f"{'then:' if i == 0 else '':<18}{line}" for i, line in enumerate(exports)),
            f"or, with hpc-serve on your laptop (a free port, reconnects, follows restarts): "
            f"hpc-serve tunnel {dep_id} --via {via}"]


# --- waiting -------------------------------------------------------------------------------

def wait_with_view(target: Deployment | str, home: str | None, timeout_s: float | None) -> DeploymentStatus:
    """wait_ready, showing progress on stderr (a live spinner when stderr is a terminal)."""
    from ..client.waiting import Progress, wait_ready

    live = console(stderr=True).status("waiting for the deployment") if sys.stderr.isatty() else None

    def show(progress: Progress) -> None:
        text = f"[{progress.waited_s:6.1f} s] {progress.line()}"
        if live is not None:
            live.console.print(text, markup=False)
            live.update(f"{progress.line()}  (Ctrl-C stops waiting; the deployment keeps running)")
        else:
            print(text, file=sys.stderr, flush=True)

    with live if live is not None else contextlib.nullcontext():
        return wait_ready(target, home=home, timeout_s=timeout_s, on_update=show)


# --- tables ---------------------------------------------------------------------------------

def show_plan(launch: LaunchPlan, sources: dict[str, str]) -> None:
    """The layout table, the exact commands and where derived values came from (`hpc-serve plan`)."""
    from rich.table import Table

    out = console()
    spec, lay = launch.spec, launch.spec.layout
    title = (f"{spec.model}: {lay.nodes} node(s) x {lay.gpus_per_node} GPUs, tp={lay.tp} pp={lay.pp} "
             f"dp={lay.dp}" + (f" ep={lay.ep_size}" if lay.ep else "") + f", launcher={lay.launcher}")
    table = Table(title=title)
    for column in ("node", "role", "GPUs", "PP stages", "DP ranks"):
        table.add_column(column)
    for node in launch.nodes:
        table.add_row(str(node.rank), node.role, ",".join(map(str, node.gpus)),
                      ",".join(map(str, node.stages)), ",".join(map(str, node.dp_ranks)))
    out.print(table)
    for node in launch.nodes:
        for process in node.processes:
            env = " ".join(f"{k}={shlex.quote(v)}" for k, v in process.env)
            out.print(f"[bold]node {node.rank} {process.name}:[/bold] "
                      f"{env + ' ' if env else ''}{shlex.join(process.argv)}", soft_wrap=True)
    out.print(f"gpus_per_node={lay.gpus_per_node} from {sources.get('gpus_per_node', 'given')}")
    out.print(f"Slurm is asked for {lay.nodes} node(s); {spec.resources_text()}")
    for note in lay.notes:
        out.print(f"derived: {note}")
    out.print("Placeholders (<head-ip>, <api-port>, ...) are filled in by the node agent at run time.")


def show_config(settings: Settings, with_sources: bool) -> None:
    """Every resolved setting (and the layer it came from) as a table."""
    from rich.table import Table

    table = Table(title=f"hpc-serve configuration (profile: {settings.profile or 'none'})")
    for column in ("key", "value") + (("from",) if with_sources else ()):
        table.add_column(column)
    for key in sorted(settings.values):
        row = [key, repr(settings.values[key])]
        table.add_row(*(row + [settings.sources[key]] if with_sources else row))
    console().print(table)


def age(seconds: float) -> str:
    """A short age: 42s, 17m, 3.5h."""
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def status_table(rows: list[DeploymentStatus]) -> None:
    """squeue-style aligned columns: fast for hundreds of rows, and easy to grep."""
    header = ("ID", "NAME", "MODEL", "LAYOUT", "SLURM", "PHASE", "ENDPOINT", "AGE")
    lines = [header]
    for row in rows:
        # one deployment: the phase with its reason's first line; many: the phase alone
        first, _, _rest = row.reason.partition("\n")
        phase = row.phase + (f": {first}" if first and len(rows) == 1 else "")
        lines.append((row.id, row.name, row.model, row.layout, row.slurm_state,
                      row.problem or phase, row.endpoint or "-", age(row.age_s)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    for line in lines:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)) + "  " + line[-1])
    if len(rows) == 1 and "\n" in rows[0].reason:
        print("\n" + "\n".join("  " + line for line in rows[0].reason.splitlines()[1:]))
    if len(rows) == 1 and rows[0].startup:
        print(f"\nstart-up, {sum(seconds for _, seconds in rows[0].startup):.1f} s to READY:")
        print("\n".join(f"  {seconds:7.1f} s  {name}" for name, seconds in rows[0].startup))
    if len(rows) == 1 and rows[0].preflight:
        print("\npreflight:")
        print("\n".join(f"  node {node.get('rank')}: {node.get('summary', '?')}" for node in rows[0].preflight))
    if len(rows) == 1 and rows[0].restarts:
        print(f"\nrestarted {len(rows[0].restarts)} time(s):")
        print("\n".join("  " + line for line in rows[0].restarts))
    if len(rows) == 1 and (rows[0].load or rows[0].load_error):
        print("\nnow (vLLM's /metrics):")
        print("\n".join(f"  {engine.describe()}" for engine in rows[0].load) or f"  {rows[0].load_error}")


def watch_status(read: Callable[[], "DeploymentStatus"], every_s: float = 2.0) -> int:
    """`status ID --watch`: the status, redrawn every ``every_s`` until the deployment ends or
    Ctrl-C (exit 0 either way)."""
    import io
    import time

    from rich.live import Live
    from rich.text import Text

    def frame() -> tuple[Text, bool]:
        row = read()
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            status_table([row])
        return Text(out.getvalue().rstrip() + f"\n\n(every {every_s:g} s; Ctrl-C to stop)"), row.live

    try:
        text, live = frame()
        with Live(text, console=console(), auto_refresh=False) as screen:
            while live:
                time.sleep(every_s)
                text, live = frame()
                screen.update(text, refresh=True)
    except KeyboardInterrupt:
        pass
    return 0


def smoke_table(results: list[Any], title: str) -> None:
    """One row per check of `hpc-serve smoke`: PASS, FAIL or SKIP, its time and detail."""
    from rich.table import Table

    table = Table(title=title)
    for column in ("check", "result", "ms", "detail"):
        table.add_column(column, justify="right" if column == "ms" else "left")
    for r in results:
        shown = {True: "[green]PASS[/]", False: "[red]FAIL[/]", None: "[yellow]SKIP[/]"}[r.ok]
        table.add_row(r.name, shown, f"{r.seconds * 1000:.0f}", r.detail)
    console().print(table)


def bench_table(runs: list[Any]) -> None:
    """`hpc-serve bench`: vLLM's figures, one column per deployment (and their ratio for two)."""
    from rich.table import Table

    from ..client.bench import shown_rows

    table = Table(title="vllm bench serve: " + " vs ".join(f"{run.id} ({run.url})" for run in runs))
    table.add_column("")
    for run in runs:
        table.add_column(run.id, justify="right")
    if len(runs) == 2:
        table.add_column(f"{runs[1].id} / {runs[0].id}", justify="right")
    values = [{label: (text, value) for label, text, value in shown_rows(run.result)} for run in runs]
    for label, _, _ in shown_rows({**runs[-1].result, **runs[0].result}):
        cells = [v.get(label, ("", 0.0))[0] for v in values]
        if len(runs) == 2:
            a, b = (v.get(label, ("", 0.0))[1] for v in values)
            cells.append(f"{b / a:.3f}" if a else "")
        table.add_row(label, *cells)
    console().print(table)


def smoke_summary(results: list[Any]) -> str:
    """``N passed, M failed, K skipped: names of the failed``."""
    failed = [r.name for r in results if r.ok is False]
    passed = sum(r.ok is True for r in results)
    return (f"{passed} passed, {len(failed)} failed, {len(results) - passed - len(failed)} skipped"
            + (f": {', '.join(failed)}" if failed else ""))
