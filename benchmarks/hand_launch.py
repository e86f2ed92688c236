"""vLLM launched by hand on every node of a job (one srun task per node): the baseline of
benchmarks/bootstrap.py. No agent, no registry: the flags a person would type, each node's own
VLLM_HOST_IP, and vLLM's caches where the user has them (its defaults, warm after the first run).
Node 0 prints `RESULT {"start": t, "health": t}` where start is just before vLLM is started and
health is its first 200 on /health (polled every 20 ms)."""

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request


def main(engine_cmd: str, model: str, nodes: int, head: str, api_port: int, master_port: int,
         eager: bool) -> int:
    rank = int(os.environ["SLURM_NODEID"])
    ip = socket.gethostbyname(socket.gethostname())
    head_ip = socket.gethostbyname(head)
    argv = [*shlex.split(engine_cmd), model, "--tensor-parallel-size", str(nodes), "--max-model-len", "512"]
    argv += ["--enforce-eager"] if eager else []
    if nodes > 1:
        argv += ["--distributed-executor-backend", "mp", "--nnodes", str(nodes), "--node-rank", str(rank),
                 "--master-addr", head_ip, "--master-port", str(master_port)]
    argv += ["--headless"] if rank > 0 else ["--host", ip, "--port", str(api_port)]
    env = {**os.environ, "VLLM_HOST_IP": ip, "VLLM_CPU_KVCACHE_SPACE": "1"}
    start = time.time()
    engine = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # the job's end: still run `finally`
    try:
        if rank > 0:
            return engine.wait()
        while engine.poll() is None:
            try:
                with urllib.request.urlopen(f"http://{ip}:{api_port}/health", timeout=1) as response:
                    if response.status == 200:
                        print("RESULT " + json.dumps({"start": start, "health": time.time()}), flush=True)
                        return 0
            except OSError:
                pass
            time.sleep(0.02)
        print(f"RESULT-FAILED vLLM exited with {engine.returncode}", flush=True)
        return 1
    finally:
        os.killpg(engine.pid, signal.SIGKILL)


if __name__ == "__main__":
    engine_cmd, model, nodes, head, api_port, master_port, eager = sys.argv[1:8]
    sys.exit(main(engine_cmd, model, int(nodes), head, int(api_port), int(master_port), eager == "eager"))
