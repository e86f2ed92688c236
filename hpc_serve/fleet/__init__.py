"""Replicas behind one endpoint: N deployments of one layout, vllm-router in front of them.

- ``front``: the group's public address. It checks the group's key on every request and never
  lets anyone reach the router's admin routes, then relays the bytes to vllm-router on loopback.
- ``router``: vllm-router's command line and its admin API (add, remove, list workers).
- ``members``: which replicas should be in the router now, read from the registry.
- ``keeper``: the process that runs all three, as its own Slurm job or on this machine.
- ``group``: the login side: submit a group, scale it, cancel it.

Everything but ``group`` runs inside the router's allocation and is stdlib only.
"""
