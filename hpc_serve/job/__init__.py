"""One Slurm request, submitted two ways: a rendered sbatch script or a submitit job."""
