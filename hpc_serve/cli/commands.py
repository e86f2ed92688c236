"""The commands of `hpc-serve`: each a thin call into hpc_serve.api or hpc_serve.client, then a view.

Every handler takes the parsed arguments and the vLLM arguments (after ``--``) and returns the
exit code; errors are HpcServeError, turned into a message and exit code 2 by cli/app.py.
Imports happen inside the handlers, so that building the parser stays light.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import HpcServeError
from . import views

Args = argparse.Namespace


def _resolve(ns: Args, vllm_args: list[str]):
    """(spec, settings) from the deployment flags; the flags are the options table's."""
    from ..api import resolve
    from .parser import spec_options

    options = spec_options(ns)
    return resolve(ns.model, profile=ns.profile, **options, vllm_args=vllm_args or None)


def _command_line(argv: list[str], vllm_args: list[str]) -> str:
    import shlex

    words = ["hpc-serve", *argv] + (["--", *vllm_args] if vllm_args else [])
    return " ".join(shlex.quote(word) for word in words)


def _client_settings(profile: str | None = None) -> dict[str, Any]:
    """The resolved settings for commands that read deployments (home, login_host, ssh_cmd)."""
    from ..planner.settings import resolve_settings

    return resolve_settings({}, profile=profile).values


def cmd_render(ns: Args, vllm_args: list[str]) -> int:
    from ..job.sbatch import render_script

    spec, settings = _resolve(ns, vllm_args)
    if settings.values.get("replicas"):
        raise HpcServeError("render writes one job's script; --replicas makes several jobs and a router.",
                            "Submit the group with: hpc-serve submit MODEL --replicas N ...")
    views.show_sizing(settings.sizing, brief=True)
    views.warn(spec.warnings)
    script = render_script(spec, settings.sources, command=_command_line(ns.argv, vllm_args))
    if ns.output is None:
        sys.stdout.write(script)
        return 0
    import shlex
    from pathlib import Path

    try:
        Path(ns.output).write_text(script)
    except OSError as exc:
        raise HpcServeError(f"Cannot write {ns.output}: {exc.strerror}.", "Choose a writable path.") from None
    print(f"wrote {ns.output}  (submit it with: sbatch {shlex.quote(ns.output)})", file=sys.stderr)
    return 0


def cmd_plan(ns: Args, vllm_args: list[str]) -> int:
    from ..planner.launch import make_plan

    if ns.suggest:
        ns.tp = "auto"
    spec, settings = _resolve(ns, vllm_args)
    launch = make_plan(spec)
    if ns.json:
        import json

        print(json.dumps({**launch.to_dict(), "sources": settings.sources, "sizing": list(settings.sizing)}, indent=2))
        return 0
    views.show_sizing(settings.sizing)
    views.show_plan(launch, settings.sources)
    views.warn(spec.warnings)
    return 0


def cmd_submit(ns: Args, vllm_args: list[str]) -> int:
    from ..job.submission import submit

    spec, settings = _resolve(ns, vllm_args)
    views.show_sizing(settings.sizing, brief=True)
    views.warn(spec.warnings)
    if settings.values.get("replicas"):
        return _submit_group(ns, spec, settings)
    dep = submit(spec)
    print(f"submitted {dep.id} ({spec.name}): {spec.model} on {spec.layout.nodes} node(s)")
    print(f"registry: {dep.path}")
    print(f"follow it with: hpc-serve status {dep.id}   |   hpc-serve logs {dep.id} -f", flush=True)
    if ns.no_wait:
        return 0
    return _wait(dep, None, ns.timeout, settings.values.get("login_host"))


def _submit_group(ns: Args, spec, settings) -> int:
    from ..fleet.group import fleet_options, submit_group

    router = submit_group(spec, fleet_options(settings.values))
    slots = router.job.get("slots", [])
    print(f"submitted group {spec.name}: {len(slots)} replica(s) ({', '.join(slots)}) of {spec.model} on "
          f"{spec.layout.nodes} node(s) each, router {router.id} ({router.job.get('executor')})")
    print(f"follow it with: hpc-serve status {spec.name}   |   hpc-serve logs {spec.name} -f", flush=True)
    if ns.no_wait:
        return 0
    return _wait(router, None, ns.timeout, settings.values.get("login_host"))


def _wait(target, home: str | None, timeout_s: float | None, login_host: str | None) -> int:
    import socket

    try:
        status = views.wait_with_view(target, home, timeout_s)
    except KeyboardInterrupt:
        key = getattr(target, "id", target)
        print(f"stopped waiting; deployment {key} keeps running: hpc-serve wait {key} | "
              f"hpc-serve cancel {key}", file=sys.stderr)
        return 130
    from ..registry import Deployment, Registry, registry_root

    dep = target if isinstance(target, Deployment) else Registry(registry_root(home)).deployment(status.id)
    if dep.endpoint:
        print("\n".join(views.ready_lines(dep.id, dep.endpoint, login_host or socket.gethostname())))
    return 0


def cmd_wait(ns: Args, vllm_args: list[str]) -> int:
    settings = _client_settings()
    return _wait(ns.id, settings["home"], ns.timeout, settings.get("login_host"))


def cmd_config_show(ns: Args, vllm_args: list[str]) -> int:
    from ..planner.settings import resolve_settings
    from ..slurm import partition_gpus_per_node

    views.show_config(resolve_settings({}, profile=ns.profile, gpus_probe=partition_gpus_per_node), ns.sources)
    return 0


def cmd_status(ns: Args, vllm_args: list[str]) -> int:
    from ..client import control as client

    home = _client_settings()["home"]
    if getattr(ns, "watch", False):
        if not ns.id or ns.json:
            raise HpcServeError("--watch shows one deployment.",
                                "Give its ID, without --json: hpc-serve status ID --watch.")
        client.status(ns.id, home, live=False)  # an unknown ID fails here, before the screen is taken
        return views.watch_status(lambda: client.status(ns.id, home))
    if ns.id:
        rows = [client.status(ns.id, home)]
        group = _group_of(rows[0].id, home)
        if group is not None:
            return _show_group(group, rows[0], ns.json)
    else:
        rows = client.statuses(home, include_ended=getattr(ns, "all", False))
    if ns.json:
        import json

        print(json.dumps([row.to_dict() for row in rows], indent=2))
    elif not rows:
        print("no live deployments (hpc-serve list --all shows ended ones)")
    else:
        views.status_table(rows)
    return 0


def _group_of(key: str, home: str | None):
    """The router entry that ``key`` (an id or a name) finds, if it is one (hpc_serve.fleet), else None."""
    from ..fleet.group import is_router
    from ..registry import Registry, registry_root

    dep = Registry(registry_root(home)).find(key)
    return dep if is_router(dep) else None


def _show_group(router, row, as_json: bool) -> int:
    from ..client import control as client
    from ..fleet.group import members, replicas

    group = replicas(router)
    view = client.queue_view(group)
    rows = [client.describe(dep, view) for dep in group]
    listed = members(router)
    if as_json:
        import json

        print(json.dumps({**row.to_dict(), "replicas": [r.to_dict() for r in rows], "members": listed}, indent=2))
        return 0
    views.status_table([row])
    print("\nreplicas:")
    if rows:
        views.status_table(rows)
    else:
        print("  none yet")
    print("\nin the router (requests sent to each):" if listed else "\nin the router: none")
    for entry in listed:
        print(f"  {entry['id']:<12} {entry['url']:<32} {entry.get('requests', 0)} request(s)")
    return 0


def cmd_scale(ns: Args, vllm_args: list[str]) -> int:
    from ..fleet.group import scale

    router = _group_of(ns.id, _client_settings()["home"])
    if router is None:
        raise HpcServeError(f"{ns.id} is not a group.", "Scale a group made with: hpc-serve submit MODEL --replicas N.")
    added, cancelled = scale(router, ns.count)
    if added:
        print(f"submitted {len(added)} replica(s): {', '.join(added)} (they join the router when READY)")
    if cancelled:
        print(f"cancelled {len(cancelled)} replica(s): {', '.join(cancelled)}")
    if not added and not cancelled:
        print(f"group {router.job.get('name')} already has {ns.count} replica(s)")
    return 0


def cmd_endpoint(ns: Args, vllm_args: list[str]) -> int:
    from ..client import control as client

    data = client.endpoint(ns.id, _client_settings()["home"])
    if ns.json:
        import json

        keys = ("id", "url", "model", "served_model", "host", "hostname", "port", "api_key_file")
        print(json.dumps({key: data.get(key) for key in keys}, indent=2))
    elif ns.export:
        print("\n".join(views.export_lines(data["url"], data.get("api_key_file"))))
    else:
        print(data["url"])
    return 0


def cmd_tunnel(ns: Args, vllm_args: list[str]) -> int:
    from ..client.tunnel import Tunnel, close_background, endpoint_target, start_background, tunnel_spec
    from ..registry import Registry, registry_root

    settings = _client_settings(ns.profile)
    home = settings["home"]
    dep = Registry(registry_root(home)).find(ns.id)
    if ns.close:
        closed = close_background(dep.path)
        if not closed:
            raise HpcServeError(f"Deployment {dep.id} has no background tunnel.",
                                f"Open one with: hpc-serve tunnel {dep.id} --via LOGIN-HOST --background")
        print(f"closed the tunnel(s) of {dep.id} on local port(s) {', '.join(map(str, closed))}")
        return 0
    spec, data = tunnel_spec(dep.id, ns.via or settings.get("login_host"), ns.local_port, ns.control, home,
                             settings.get("ssh_cmd") or "ssh")
    if ns.print:
        import shlex

        print(shlex.join(spec.argv()))
        return 0
    if ns.background:
        tunnel, pid = None, start_background(spec, dep.path)
    else:
        tunnel, pid = Tunnel(spec), None
        tunnel.open()
    print(spec.up_line(pid))
    print("\n".join(views.export_lines(spec.url, data.get("api_key_file"))), flush=True)
    if tunnel is None:
        print(f"close it with: hpc-serve tunnel --close {dep.id}")
        return 0
    print("Ctrl-C to close; the tunnel reconnects if ssh drops and follows the endpoint if the "
          "deployment restarts.", file=sys.stderr, flush=True)
    try:
        tunnel.supervise(lambda message: print(message, file=sys.stderr, flush=True),
                         target=endpoint_target(dep.path))
    except KeyboardInterrupt:
        pass
    finally:
        tunnel.close()
    print("tunnel closed", file=sys.stderr)
    return 0


def cmd_smoke(ns: Args, vllm_args: list[str]) -> int:
    from ..client import control as client
    from ..client.smoke import run_checks
    from ..registry import Registry, registry_root

    home = _client_settings()["home"]
    data = client.endpoint(ns.id, home)
    url = ns.url or data["url"]
    key = Registry(registry_root(home)).deployment(data["id"]).api_key
    results = run_checks(url, key, data["served_model"])
    if ns.json:
        import json
        from dataclasses import asdict

        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        views.smoke_table(results, f"smoke test of {data['id']} at {url}")
    print(views.smoke_summary(results), file=sys.stderr)
    return 1 if any(r.ok is False for r in results) else 0


def cmd_fetch(ns: Args, vllm_args: list[str]) -> int:
    import shlex

    from ..client.fetch import fetch

    hf_home = ns.hf_home or _client_settings(ns.profile)["hf_home"]
    done = fetch(ns.model, hf_home=hf_home, revision=ns.revision, all_files=ns.all_files)
    print(done.folder)
    where = f" --hf-home {shlex.quote(done.hf_home)}" if done.hf_home else ""
    revision = f" -- --revision {shlex.quote(done.revision)}" if done.revision else ""
    print(f"in the cache; serve it with: hpc-serve submit {done.model}{where} --offline ...{revision}", file=sys.stderr)
    return 0


def cmd_bench(ns: Args, vllm_args: list[str]) -> int:
    from ..client.bench import Load, run_bench

    home = _client_settings()["home"]
    load = Load(input_len=ns.input_len, output_len=ns.output_len, prompts=ns.prompts, rate=ns.rate,
                concurrency=ns.concurrency, chat=ns.chat, seed=ns.seed, extra=tuple(vllm_args))
    load.check()
    keys = (ns.id, ns.compare) if ns.compare else (ns.id,)
    if ns.compare:
        from ..client import control

        first, second = (control.endpoint(key, home)["id"] for key in keys)  # both READY, before minutes of load
        if first == second:
            raise HpcServeError(f"--compare {ns.compare} is deployment {first} itself.", "Compare two deployments.")
    runs = []
    for key in keys:
        print(f"benchmarking {key}: {load.prompts} requests of {load.input_len} tokens in, {load.output_len} out",
              file=sys.stderr, flush=True)
        runs.append(run_bench(key, load, home, vllm_cmd=ns.vllm_cmd, tokenizer=ns.tokenizer, echo=not ns.json))
    if ns.json:
        import json

        print(json.dumps({run.id: {"url": run.url, "result_file": run.result_file, **run.result} for run in runs},
                         indent=2))
    else:
        views.bench_table(runs)
    for run in runs:
        print(f"kept: {run.result_file}", file=sys.stderr)
    return 1 if any(run.result.get("failed") for run in runs) else 0


def cmd_logs(ns: Args, vllm_args: list[str]) -> int:
    from ..client import control as client

    home = _client_settings()["home"]
    lines = client.follow(ns.id, ns.node, home) if ns.follow else client.log_lines(ns.id, ns.node, home)[1]
    for line in lines:
        print(line, flush=ns.follow)
    return 0


def cmd_cancel(ns: Args, vllm_args: list[str]) -> int:
    from ..client import control as client

    home = _client_settings()["home"]
    if ns.all:
        rows = client.cancel_all(home)
        print(f"cancelled {len(rows)} deployment(s)" + (": " + ", ".join(r.id for r in rows) if rows else ""))
        return 0
    if not ns.id:
        raise HpcServeError("Say which deployment to cancel.", "hpc-serve cancel ID, or --all.")
    group = _group_of(ns.id, home)
    if group is not None:
        from ..fleet.group import cancel_group

        ended = cancel_group(group)
        if not ended:
            raise HpcServeError(f"Group {ns.id} has already ended.", "Nothing to cancel; 'hpc-serve list' shows the live ones.")
        print(f"cancelled group {group.job.get('name')}: the router {group.id} and {len(ended) - (group.id in ended)} "
              f"replica(s)" + (f" ({', '.join(i for i in ended if i != group.id)})" if len(ended) > 1 else ""))
        return 0
    row = client.cancel(ns.id, home)
    print(f"cancelled {row.id}: {row.phase}, Slurm: {row.slurm_state}")
    return 0


def cmd_demo(ns: Args, vllm_args: list[str]) -> int:
    from ..demo import run_demo

    return run_demo(keep=ns.keep)


#: Each command of cli/parser.py (its ``command``) and the function that runs it.
HANDLERS = {
    "render": cmd_render, "plan": cmd_plan, "submit": cmd_submit, "wait": cmd_wait, "status": cmd_status,
    "list": cmd_status, "endpoint": cmd_endpoint, "tunnel": cmd_tunnel, "smoke": cmd_smoke,
    "fetch": cmd_fetch, "bench": cmd_bench, "scale": cmd_scale, "logs": cmd_logs, "cancel": cmd_cancel, "demo": cmd_demo,
    "config": cmd_config_show,
}
