"""The `cluster` and `home` fixtures live in tests/conftest.py (shared with tests/engine).

These tests are about Slurm, the registry and the agents, not vLLM: every deployment here runs a
stand-in engine (a Python process that sleeps, with the planned vLLM argv as its arguments), so
deployments stay in LOADING until cancelled. tests/engine runs real vLLM.
"""

import sys

import pytest

STAND_IN_ENGINE = f"{sys.executable} -c 'import time; time.sleep(10**6)'"


@pytest.fixture(autouse=True)
def stand_in_engine(monkeypatch):
    monkeypatch.setenv("HPC_SERVE_ENGINE_CMD", STAND_IN_ENGINE)
