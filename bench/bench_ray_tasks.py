"""What one Ray Data task costs the driver: the embed job's pipeline shape with no audio, by block size.

    .venv/bin/python -m bench.bench_ray_tasks --rows 1000,10000 --block-rows 16,64

For each catalog size and block size, in a new process with its own local Ray (4 logical CPUs): a
Parquet catalog of ``rows`` ids is read, re-blocked to ``block_rows`` rows, passed through a task that
appends a small payload per row (the decode stage), re-blocked, passed through one actor (the encoder
stage) and written to Parquet, as ``jobs/embed.py`` does. It prints the wall time and the driver's
growth over the run: PSS, the Python heap that ``tracemalloc`` sees, and glibc's heap (``mallinfo2``:
in use and free). Growth that the Python heap does not show is native bookkeeping (Ray's core worker,
gRPC, the allocator).
"""

from __future__ import annotations

import ctypes
import gc
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.bench_embed import smaps_rollup
from musiclib.core.config import parse
from musiclib.core.ray_env import ray_session


@dataclass
class TasksBenchConfig:
    """Catalog sizes and rows per block; every pair is one run."""

    rows: tuple[int, ...] = (1000, 10000)
    block_rows: tuple[int, ...] = (16, 64)
    payload_bytes: int = 256  # appended per row by the decode stage


class MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


def glibc_heap_mib() -> tuple[float, float]:
    """glibc's heap of this process: (in use, free) in MiB."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return (info.uordblks + info.hblkhd) / 2**20, info.fordblks / 2**20


def pss_mib() -> float:
    return smaps_rollup(os.getpid())["Pss"] / 2**20


def decode_stage(block: pa.Table, payload_bytes: int) -> pa.Table:
    return block.append_column("payload", pa.array([bytes(payload_bytes)] * block.num_rows))


class EncoderStage:
    def __call__(self, block: pa.Table) -> pa.Table:
        return pa.table(
            {"track_id": block["track_id"], "embedding": pa.array([np.zeros(8, np.float32)] * block.num_rows)}
        )


def run_once(rows: int, block_rows: int, payload_bytes: int) -> str:
    """One pipeline run in a local Ray started here; the line to print."""
    import ray.data

    with tempfile.TemporaryDirectory() as folder:
        catalog = f"{folder}/catalog.parquet"
        pq.write_table(
            pa.table({"track_id": [f"t{i:08d}" for i in range(rows)]}), catalog, row_group_size=10000
        )
        with ray_session():
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False
            ctx.op_resource_reservation_enabled = ctx.use_datasource_v2 = False  # as jobs/embed.py runs
            gc.collect()
            tracemalloc.start()
            start_pss, start_py, start_glibc = pss_mib(), tracemalloc.get_traced_memory()[0], glibc_heap_mib()
            start = time.perf_counter()
            ds = ray.data.read_parquet(catalog).repartition(target_num_rows_per_block=block_rows)
            ds = ds.map_batches(
                decode_stage,
                fn_kwargs={"payload_bytes": payload_bytes},
                batch_size=block_rows,
                batch_format="pyarrow",
            )
            ds = ds.repartition(target_num_rows_per_block=block_rows).map_batches(
                EncoderStage,
                compute=ray.data.ActorPoolStrategy(size=1),
                batch_size=block_rows,
                batch_format="pyarrow",
            )
            ds.write_parquet(f"{folder}/out")
            wall = time.perf_counter() - start
            gc.collect()
            py = (tracemalloc.get_traced_memory()[0] - start_py) / 2**20
            tracemalloc.stop()
            used, free = (b - a for a, b in zip(start_glibc, glibc_heap_mib()))
            pss, tasks = pss_mib() - start_pss, -(-rows // block_rows)
            return (
                f"rows {rows:>7,} blocks of {block_rows:>3} ({tasks:>5,} tasks per stage): {wall:6.1f} s, "
                f"{rows / wall:6.0f} rows/s; driver growth: PSS {pss:+6.1f} MiB, Python heap {py:+5.1f}, "
                f"glibc in use {used:+5.1f}, glibc free {free:+5.1f}"
            )


def main(argv: list[str] | None = None) -> None:
    cfg = parse(TasksBenchConfig, argv)
    if len(cfg.rows) == len(cfg.block_rows) == 1:
        print(run_once(cfg.rows[0], cfg.block_rows[0], cfg.payload_bytes), flush=True)
        return
    for rows in cfg.rows:  # each run in a new process, so that its driver starts from nothing
        for block_rows in cfg.block_rows:
            one = {"--rows": rows, "--block-rows": block_rows, "--payload-bytes": cfg.payload_bytes}
            subprocess.run(
                [sys.executable, "-m", "bench.bench_ray_tasks", *(str(x) for kv in one.items() for x in kv)],
                check=True,
            )


if __name__ == "__main__":
    main()
