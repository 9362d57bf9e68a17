"""What every stage shares: storage for local and S3 URIs, versioned datasets, configs, progress, Ray.

``storage`` (object I/O, atomic and conditional writes), ``versions`` (versioned datasets on it: ids,
manifests, ``publish``, ``_latest``, leases), ``config`` (dataclass configs with ``--field value``
overrides, the ``Layout`` under one root), ``progress`` (what a job prints), ``lifecycle`` (how every
job starts and ends: its summary and its result) and ``ray_env`` (how jobs start or join Ray, the Ray
Data Parquet read).
"""
