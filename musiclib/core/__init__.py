"""What every stage shares: storage for local and S3 URIs, versioned datasets, configs, what is printed, Ray.

``storage`` (object I/O, atomic and conditional writes, ``TransientError`` for storage that stays
unreachable), ``versions`` (versioned datasets on it: ids, manifests, ``publish``, ``_latest``, leases),
``config`` (dataclass configs with ``--field value`` overrides, the ``Layout`` under one root),
``progress`` (what a job prints), ``lifecycle`` (how every job starts and ends: its summary and its
result), ``outputs`` (what the query tools print: where a root's outputs are,
tables) and ``ray_env`` (how jobs start or join Ray, the Ray Data Parquet read).
"""
