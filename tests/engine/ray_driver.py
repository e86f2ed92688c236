"""Stands in for vLLM under the Ray launcher (real vLLM CPU refuses Ray; see docs/engine.md).

Run with the vLLM venv's Python, with the argv the planner built for vLLM. Like vLLM's Ray
executor it joins the deployment's Ray cluster as a driver (RAY_ADDRESS and the token from the
agent's environment), then proves what vLLM would rely on: every node alive, every GPU
registered, a task placed on each node. It prints that as one `RAY-DRIVER {json}` line and then
answers /health and /v1/models like vLLM with hpc-serve's key middleware (every other path
401 without the key), so that the agent's readiness and key checks pass.
"""

import json
import os
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


def option(args, name):
    return args[args.index(name) + 1]


def main(args):
    model = option(args, "--model") if "--model" in args else args[0]
    host, port = option(args, "--host"), int(option(args, "--port"))
    ray.init(logging_level="ERROR", log_to_driver=False)
    nodes = [n for n in ray.nodes() if n["Alive"]]

    @ray.remote(num_cpus=0)
    def hostname():
        return socket.gethostname()

    placed = ray.get([hostname.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote() for n in nodes])
    report = {"nodes": sorted(n["NodeManagerAddress"] for n in nodes), "hostnames": sorted(placed),
              "gpus": ray.cluster_resources().get("GPU", 0), "argv": args}
    print("RAY-DRIVER " + json.dumps(report), flush=True)

    expected = f"Bearer {os.environ.get('HPC_SERVE_API_KEY', '')}"

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/health" and self.headers.get("Authorization") != expected:
                self.send_response(401)
                self.end_headers()
                return
            body = {"/health": b"", "/v1/models": json.dumps(
                {"object": "list", "data": [{"id": model, "object": "model"}]}).encode()}.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.end_headers()
            self.wfile.write(body or b"")

        do_POST = do_GET

        def log_message(self, *_):
            pass

    ThreadingHTTPServer((host, port), Handler).serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
