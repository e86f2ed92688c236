"""The rich view of a LaunchPlan (`hpc-serve plan`)."""

from __future__ import annotations

import shlex

from ..planner.launch import LaunchPlan


def show_plan(launch: LaunchPlan, sources: dict[str, str], console) -> None:
    """Print the layout table, the exact commands and where derived values came from."""
    from rich.table import Table

    spec, lay = launch.spec, launch.spec.layout
    title = (f"{spec.model}: {lay.nodes} node(s) x {lay.gpus_per_node} GPUs, tp={lay.tp} pp={lay.pp} "
             f"dp={lay.dp}" + (f" ep={lay.ep_size}" if lay.ep else "") + f", launcher={lay.launcher}")
    table = Table(title=title)
    for column in ("node", "role", "GPUs", "PP stages", "DP ranks"):
        table.add_column(column)
    for node in launch.nodes:
        table.add_row(str(node.rank), node.role, ",".join(map(str, node.gpus)),
                      ",".join(map(str, node.stages)), ",".join(map(str, node.dp_ranks)))
    console.print(table)
    for node in launch.nodes:
        for process in node.processes:
            env = " ".join(f"{k}={shlex.quote(v)}" for k, v in process.env)
            console.print(f"[bold]node {node.rank} {process.name}:[/bold] "
                          f"{env + ' ' if env else ''}{shlex.join(process.argv)}", soft_wrap=True)
    console.print(f"gpus_per_node={lay.gpus_per_node} from {sources.get('gpus_per_node', 'given')}")
    console.print(f"Slurm is asked for {lay.nodes} node(s); {spec.resources_text()}")
    for note in lay.notes:
        console.print(f"derived: {note}")
    console.print("Placeholders (<head-ip>, <api-port>, ...) are filled in by the node agent at run time.")
