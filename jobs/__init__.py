"""The jobs: thin Ray entrypoints around musiclib, one module per job, run as ``python -m jobs.<job>``."""
