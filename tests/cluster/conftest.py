"""Fixtures `cluster` and `home` live in tests/conftest.py (shared with tests/engine)."""
