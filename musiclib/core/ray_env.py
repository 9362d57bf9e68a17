"""How every job starts or joins Ray: a new local Ray by default, the cluster when ``RAY_ADDRESS`` is set.

Only non-secret S3 settings travel to workers in the runtime env. Credentials never do: local workers
inherit the driver's environment, and cluster nodes have their own (an IAM role on AWS, a Kubernetes
Secret on KubeRay, the shell that ran ``ray start``). A runtime env is stored by the cluster and shown
on its dashboard, so a secret put there would leak. In ``musiclib``, Ray is imported here and in
``progress`` only, inside functions, never by the math.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ray.data

FORWARDED = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")
TASK_RETRIES = 6  # tag and suggest tasks run again after S3 errors (Ray Data backs off ~1 min in all)


def forwarded_env() -> dict[str, str]:
    """The S3 settings (endpoint, region; never credentials) that workers should see as the driver does."""
    return {k: os.environ[k] for k in FORWARDED if os.environ.get(k)}


@contextlib.contextmanager
def ray_session(
    address: str = "",
    num_cpus: int | None = None,
    log_to_driver: bool = True,
    include_dashboard: bool = False,
) -> Iterator[bool]:
    """Ray for the duration of a job: started or joined on entry, shut down on exit if started here.

    ``address`` (or ``RAY_ADDRESS``, set inside a submitted job) joins that cluster. Otherwise a new local
    Ray starts with ``num_cpus`` logical CPUs (at least 4: Ray Data's checkpoint filters and Tune's
    controller need spare slots on a 2-core machine), never attaching to another Ray on the machine.
    Inside a Ray that is already running (a test's, a notebook's) it does nothing. The dashboard (off by
    default) also serves Ray's State API, which Ray Train's placement-group cleaner polls. Yields whether
    a new local Ray was started. Ray's INFO output goes to its log files only, unless ``--verbose``
    (``progress.quiet_ray``); warnings and errors, the workers' included, still reach the console.
    """
    import ray

    from musiclib.core import progress

    started = local = False
    if not ray.is_initialized():
        joining = address or os.environ.get("RAY_ADDRESS")
        kwargs = {
            "include_dashboard": include_dashboard,
            "log_to_driver": log_to_driver,
            "logging_level": progress.quiet_ray(),
            "runtime_env": {"env_vars": {**forwarded_env(), **progress.worker_env()}},
        }
        if joining:
            ray.init(address=address or None, **kwargs)
        else:
            ray.init(address="local", num_cpus=max(4, num_cpus or os.cpu_count() or 1), **kwargs)
            local = True
        started = True
        progress.set_logs_dir(ray._private.worker._global_node.get_logs_dir_path())
    try:
        yield local
    finally:
        if started:
            ray.shutdown()


def transient_storage_markers() -> list[str]:
    """Text that marks a storage failure that may pass: ``storage.TransientError`` (the decoder's, after its
    own retries) and the S3 errors Ray Data retries in its own I/O (``retried_io_errors``: "AWS Error
    NETWORK_CONNECTION", ...)."""
    import ray.data

    from musiclib.core import storage

    return [storage.TRANSIENT, *ray.data.DataContext.get_current().retried_io_errors]


def is_transient_storage_failure(exc: BaseException) -> bool:
    """Whether ``exc``, or an exception it was raised from, names a storage failure that may pass.

    The text of each exception in the chain is searched, as Ray Data matches its own retries; the chain
    includes what Ray Train's ``ControllerError`` wraps (``controller_failure``), which it does not chain.
    """
    markers = transient_storage_markers()
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if any(marker in str(exc) for marker in markers):
            return True
        exc = exc.__cause__ or exc.__context__ or getattr(exc, "controller_failure", None)
    return False


@contextlib.contextmanager
def retry_transient_storage(retries: int) -> Iterator[None]:
    """Ray Data map tasks that fail on unreachable storage run again, up to ``retries`` times.

    Retried: ``storage.TransientError`` (storage that stayed unreachable through the decoder's own backoff
    fails the task rather than the track) and the S3 errors Ray Data itself treats as transient in its
    I/O (``retried_io_errors``: "AWS Error NETWORK_CONNECTION", 503 SlowDown, ...), which its listing
    of input files (``ListFiles``) otherwise lets fail the job at the first attempt. Ray Data waits
    ``2 ** attempt`` s (with jitter, at most 32 s) between attempts. Any other exception still fails the
    job. Ray Data's previous setting is restored on exit.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    previous = ctx.retried_map_errors, ctx.max_map_retries
    ctx.retried_map_errors, ctx.max_map_retries = transient_storage_markers(), retries
    try:
        yield
    finally:
        ctx.retried_map_errors, ctx.max_map_retries = previous


def read_parquet(
    uris: str | list[str], columns: list[str], concurrency: int | None = None
) -> ray.data.Dataset:
    """The one Ray Data read of Parquet files (or folders of them) on any storage, only ``columns``.

    Every URI is on the storage of the first (a catalog, or the files of one manifest). It uses Ray
    Data's first Parquet reader: the second one (``use_datasource_v2``, the 2.60 default) reads file
    footers in nested tasks that each wait for a new worker, seconds per run on a small node and one
    more Python process per footer reader at the job's peak memory (docs/BENCHMARKS.md). Ray Data picks
    the reader when the read is called, so the setting is restored right after. The reader samples a few
    files under a tqdm bar of its own, which a log file shows as one line garbled by carriage returns:
    that bar is off when stdout is not a terminal (the job's progress lines say the rest).

    With ``concurrency`` (``uris`` are then files) at most that many files are read at once, each as one
    block, so a map of the same concurrency fuses with the read into one task per file.
    """
    import ray.data

    from musiclib.core import storage

    uris = [uris] if isinstance(uris, str) else uris
    fs, _ = storage.arrow_filesystem(uris[0])
    paths = [storage.split_uri(u)[1] for u in uris]
    ctx = ray.data.DataContext.get_current()
    previous = ctx.use_datasource_v2, ctx.enable_progress_bars
    ctx.use_datasource_v2, ctx.enable_progress_bars = False, previous[1] and sys.stdout.isatty()
    try:
        per_file = {"concurrency": concurrency, "override_num_blocks": len(paths)} if concurrency else {}
        return ray.data.read_parquet(paths, filesystem=fs, **per_file).select_columns(columns)
    finally:
        ctx.use_datasource_v2, ctx.enable_progress_bars = previous


DEVICES = ("auto", "cpu", "gpu")


@dataclass(frozen=True)
class Device:
    """Where a job runs its model, and why, in one line the job prints first and keeps in its summary."""

    gpu: bool
    reason: str
    gpus: float = 0.0  # GPUs the cluster has, or can scale to when it has none yet

    @property
    def name(self) -> str:
        return "gpu" if self.gpu else "cpu"


def choose_device(requested: str, now: dict[str, float], most: dict[str, float]) -> Device:
    """The device for ``--device`` on a cluster with resources ``now`` that may scale to ``most``.

    ``auto`` asks for GPUs when the cluster has them or its autoscaler can start them (GPU worker groups
    that start at zero nodes), so the request itself makes the autoscaler start one; only a cluster with
    no GPU and none to scale to runs on the CPU, and says so. ``gpu`` on such a cluster is an error
    (``ConfigError``), never a silent CPU run; ``cpu`` never asks for one.
    """
    from musiclib.core.config import ConfigError

    gpus_now, gpus_most = now.get("GPU", 0.0), most.get("GPU", 0.0)
    if requested == "cpu":
        return Device(False, "cpu, as --device cpu asks")
    if gpus_now > 0:
        return Device(True, f"gpu: the cluster has {gpus_now:g} GPU(s)", gpus_now)
    if gpus_most > 0:
        return Device(
            True,
            f"gpu: none started yet, the autoscaler can start up to {gpus_most:g}; requesting them",
            gpus_most,
        )
    if requested == "gpu":
        raise ConfigError(
            "--device gpu: the cluster has no GPU and its autoscaler can start none (--device cpu?)"
        )
    return Device(False, "cpu: the cluster has no GPU and its autoscaler can start none (CPU fallback)")


def cluster_device(requested: str) -> Device:
    """``choose_device`` for the Ray cluster this process is connected to (``ray_session``)."""
    import ray

    try:
        most = ray._private.state.state.get_max_resources_from_cluster_config() or {}
    except Exception:  # a Ray without an autoscaler config (a local Ray) answers nothing to scale to
        most = {}
    return choose_device(requested, ray.cluster_resources(), {k: float(v) for k, v in most.items()})
