"""The node agent: what runs on every node inside the allocation (stdlib only).

`python -m hpc_serve.node` (the sbatch srun line) and `agent.run_task` (submitit) run the same code.
One module a job: ``agent`` (entry points and the run's state machine), ``context`` (one node's run
as an object), ``args`` (its command line), ``joining`` (address, node records, waiting for each
other), ``ray_cluster`` (forming Ray), ``engine`` (the processes started and left), ``environment``
(what an engine's environment adds to the plan), ``runtime`` (ports, addresses, temp folder),
``readiness`` (whether vLLM serves), ``publish`` (the endpoint), ``heartbeat`` (signs of life),
``ending`` (why a signal came), ``outcome`` (recording how a run ends), ``renew`` (--auto-renew),
``cleanup`` (temp files, /dev/shm, leftovers), ``logs`` (the node log and failure reasons),
``netaddr`` (choosing the address) and ``polling`` (the one wait loop).
"""
