"""Shared fixtures: every test runs with an isolated HOME and config, so a developer's own
~/.config/hpc-serve or HPC_SERVE_* variables never change a result."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def isolated_config(tmp_path, monkeypatch):
    for name in list(os.environ):
        if name.startswith("HPC_SERVE_") or name.startswith("SBATCH_"):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setenv("HPC_SERVE_SITE_CONFIG", str(tmp_path / "site.toml"))
    return home
