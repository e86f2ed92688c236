"""`hpc-serve demo`: the whole path on one machine, with nothing to prepare.

Starts a throwaway 2-node Slurm cluster (hpc_serve.demo.localcluster), installs vLLM's CPU build and
makes a tiny model offline (once per machine), submits a real 2-node deployment of it (PP=2,
vLLM's mp launcher), waits until it serves, sends a chat request, prints the endpoint, and tears
everything down (or keeps it with --keep). Needs root and Debian/Ubuntu packages.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request

from ..errors import HpcServeError

READY_TIMEOUT_S = 900.0


def _say(message: str) -> None:
    print(f"demo: {message}", flush=True)


def _chat(url: str, model: str, api_key: str) -> tuple[str, float]:
    body = json.dumps({"model": model, "max_tokens": 12,
                       "messages": [{"role": "user", "content": "Say hello to the cluster."}]}).encode()
    request = urllib.request.Request(f"{url}/chat/completions", data=body,
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {api_key}"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.loads(response.read())
    return answer["choices"][0]["message"]["content"], time.perf_counter() - start


def run_demo(keep: bool = False) -> int:
    """Run the demo; returns the exit code."""
    from ..client import control as client
    from ..client.handle import DeploymentHandle
    from . import localcluster
    from ..planner.spec import build_spec
    from ..job.submission import submit
    from .vllm_env import ensure_vllm_env

    localcluster.require_root()
    env = ensure_vllm_env(_say)
    _say("starting a throwaway 2-node Slurm cluster (network namespaces, 1 fake GPU used per node)")
    cluster = localcluster.up(nodes=2)
    os.environ["SLURM_CONF"] = cluster.slurm_conf
    home = os.path.join(cluster.shared_dir, f"demo-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        spec = build_spec(model=env.model, nodes=2, gpus_per_node=1, pp=2, launcher="mp", name="demo",
                          engine_cmd=env.engine_cmd, env=["VLLM_CPU_KVCACHE_SPACE=1"],
                          vllm_args=["--max-model-len", "512"], home=home)
        dep = DeploymentHandle.of(submit(spec))
        _say(f"submitted job {dep.id}: hpc-serve submit {env.model} --nodes 2 --pp 2 --launcher mp")
        try:
            dep.wait_ready(READY_TIMEOUT_S, lambda p: _say(f"[{p.waited_s:5.1f} s] {p.line()}"))
        except HpcServeError as exc:
            raise HpcServeError(f"The demo deployment did not serve: {exc.problem}",
                                f"Its logs: {dep.path}/logs") from None
        endpoint = dep.read("endpoint.json")
        reply, seconds = _chat(endpoint["url"], endpoint["served_model"], dep.api_key)
        _say(f"endpoint {endpoint['url']} (on {endpoint['hostname']}), model {endpoint['served_model']}")
        _say(f"chat reply in {seconds:.2f} s (a random tiny model, so gibberish): {reply!r}")
        if keep:
            _say(f"kept running. Try: curl -H \"Authorization: Bearer $(cat {endpoint['api_key_file']})\" "
                 f"{endpoint['url']}/models")
            _say(f"then: SLURM_CONF={cluster.slurm_conf} HPC_SERVE_HOME={home} hpc-serve cancel {dep.id}; "
                 "python -m hpc_serve.demo.localcluster down")
            return 0
        client.cancel(dep.id, home)
        _say("cancelled the deployment")
        return 0
    finally:
        if not keep:
            localcluster.down()
            _say("cluster removed (python -m hpc_serve.demo.localcluster down)")
