"""The `hpc-serve` command line: a thin layer over the Python API and the client."""
