"""The version of hpc-serve (read by the build, the CLI and the sbatch header)."""

__version__ = "0.1.0"
