"""Ray Data's two Parquet readers on a catalog file: why the embed job reads with the first one.

    .venv/bin/python -m bench.bench_ray_read --catalog /tmp/bench_embed/catalog-1000/catalog/tracks.parquet

Times ``ray.data.read_parquet(catalog).materialize()`` on a warm local Ray (``ray_session``), alternating
the default reader (``use_datasource_v2``, Ray 2.60) and the first one, ``repeats`` times each, and prints
every time and the fastest of each.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from musiclib.core import storage
from musiclib.core.config import parse
from musiclib.core.ray_env import ray_session


@dataclass
class ReadBenchConfig:
    """The Parquet file to read and how often."""

    catalog: str = "/tmp/bench_embed/catalog-1000/catalog/tracks.parquet"
    repeats: int = 3


def main(argv: list[str] | None = None) -> None:
    import ray.data

    cfg = parse(ReadBenchConfig, argv)
    fs, path = storage.arrow_filesystem(cfg.catalog)
    times: dict[bool, list[float]] = {True: [], False: []}
    with ray_session():
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ray.data.read_parquet(path, filesystem=fs).materialize()  # starts the workers: not counted
        for _ in range(cfg.repeats):
            for v2 in (True, False):
                ctx.use_datasource_v2 = v2
                start = time.perf_counter()
                ray.data.read_parquet(path, filesystem=fs).materialize()
                times[v2].append(time.perf_counter() - start)
    for v2, name in ((True, "default reader (datasource v2)"), (False, "first reader")):
        runs = ", ".join(f"{t:.2f}" for t in times[v2])
        print(f"{name}: {runs} s; fastest {min(times[v2]):.2f} s")


if __name__ == "__main__":
    main()
