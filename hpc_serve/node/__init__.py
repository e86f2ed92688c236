"""The node agent: what runs on every node inside the allocation (stdlib only).

`python -m hpc_serve.node` (the sbatch srun line) and `agent.run_task` (submitit) run the same code.
"""
