"""What a person watching a job sees: Ray kept quiet, one progress line per stage, a summary at the end.

- ``quiet_ray()`` (called by ``ray_env.ray_session`` before Ray starts): Ray's INFO chatter goes to its log
  files only, warnings and errors still reach the console. ``--verbose`` on any job (or
  ``MUSICLIB_VERBOSE=1``) leaves Ray as it is.
- ``counting(...)``: the progress of a Ray Data stage from the job's own counters: its tasks and actors add
  to a counter actor, and a driver thread prints one line per ``INTERVAL_S`` (tracks done / total, rate,
  ETA), whatever Ray Data logs. In a terminal Ray Data also draws its own bars.
- ``Throttle`` and ``eta``: progress lines of a loop whose length is known (pretraining steps, tune trials),
  at most one per interval, and the last one always.
- ``summary(...)``: the end of every job (through ``lifecycle.Job``): what it read, wrote and skipped (and
  why), how long it took and where its outputs are; printed, and written as JSON to
  ``<root>/summaries/<job>.json`` so that ``python -m musiclib.tag.tags outputs`` (``outputs.print_outputs``) can show the whole chain
  as one table from what was written.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TextIO

from musiclib.core import storage, versions

VERBOSE_ENV = "MUSICLIB_VERBOSE"
INTERVAL_S = 30.0  # seconds between two progress lines of one stage when stdout is not a terminal
JOBS = ("demo-catalog", "pretrain", "embed", "tune", "tag")  # the chain, in order
SUMMARIES = "summaries"  # <root>/summaries/<job>.json

_logs_dir = ""  # where Ray's log files of this session are (``ray_env.ray_session``)


def verbose() -> bool:
    """Whether Ray's INFO output should reach the console (``--verbose`` or ``MUSICLIB_VERBOSE=1``)."""
    return os.environ.get(VERBOSE_ENV, "").lower() in ("1", "true", "yes", "on")


def set_verbose(on: bool) -> None:
    """Record ``--verbose`` in the environment, where local Ray workers inherit it."""
    if on:
        os.environ[VERBOSE_ENV] = "1"
    else:
        os.environ.pop(VERBOSE_ENV, None)


def worker_env() -> dict[str, str]:
    """``--verbose`` for the runtime env of the job's workers, which may run on other machines."""
    return {VERBOSE_ENV: "1"} if verbose() else {}


def set_logs_dir(path: str) -> None:
    global _logs_dir
    _logs_dir = path


# --------------------------------------------------------------------------- durations and rates


def duration(seconds: float) -> str:
    """``42 s``, ``3m 05s`` or ``2h 07m``: short enough for a progress line."""
    if seconds != seconds or seconds < 0:  # nan: no rate yet
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def eta(done: float, total: float, rate: float) -> str:
    """Time left for ``total - done`` units at ``rate`` units per second."""
    if rate <= 0 or total <= 0:
        return "?"
    return duration(max(total - done, 0) / rate)


class Throttle:
    """Says when a progress line is due: the first, then at most one per ``every_s`` seconds, and the last."""

    def __init__(self, every_s: float = INTERVAL_S, clock: Callable[[], float] = time.monotonic):
        self.every_s, self.clock = every_s, clock
        self.last: float | None = None

    def due(self, final: bool = False) -> bool:
        now = self.clock()
        if final or self.last is None or now - self.last >= self.every_s:
            self.last = now
            return True
        return False


def progress_line(label: str, done: int, total: int | None, unit: str, rate: float, **fields: Any) -> str:
    """``embed: 120/300 rows (40%) | 4.1 rows/s | ETA 44 s | errors 2``: one line a person can follow."""
    if total:
        head = f"{label}: {done}/{total} {unit} ({100 * done / total:.0f}%)"
    else:
        head = f"{label}: {done} {unit}"
    parts = [head, f"{rate:.1f} {unit}/s" if rate >= 0.1 or rate <= 0 else f"{60 * rate:.1f} {unit}/min"]
    if total:
        parts.append(f"ETA {eta(done, total, rate)}")
    parts += [f"{k.replace('_', ' ')} {v}" for k, v in fields.items()]
    return " | ".join(parts)


# --------------------------------------------------------------------------- Ray's console output


class DataWarnings(logging.Handler):
    """The console handler of the ``ray.data`` logger when not verbose: warnings and errors are printed as
    Ray prints them; INFO records (its progress blocks included) go to Ray Data's log file only
    (``ray-data.log`` in the session's log folder), where its file handler writes them."""

    def __init__(self, stream: TextIO | None = None):
        super().__init__(logging.WARNING)
        self.stream = stream
        self.setFormatter(
            logging.Formatter("%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s")
        )

    def emit(self, record: logging.LogRecord) -> None:
        stream = self.stream or sys.stderr
        stream.write(self.format(record) + "\n")
        stream.flush()


# --------------------------------------------------------------------------- Ray Data stages


def _counter_class() -> Any:
    import ray

    @ray.remote(num_cpus=0)
    class Counts:
        """Counts that a stage's tasks and actors add to (``add.remote({...})``), read by the driver."""

        def __init__(self) -> None:
            self.counts: dict[str, int] = {}

        def add(self, counts: dict[str, int]) -> None:
            for key, n in counts.items():
                self.counts[key] = self.counts.get(key, 0) + int(n)

        def read(self) -> dict[str, int]:
            return dict(self.counts)

    return Counts


@contextlib.contextmanager
def counting(
    label: str, total: int | None, unit: str, key: str, stream: TextIO | None = None
) -> Iterator[Any]:
    """A counter actor for a Ray Data stage's workers, and one progress line per ``INTERVAL_S`` from it.

    Workers call ``counter.add.remote({key: n, ...})``; ``key`` counts toward ``total``, other keys are
    shown beside it. A driver thread reads the counts and prints the line (the first once something is
    done), and a last line when the block ends. Lines come from the job's counters, not from Ray Data's log
    output, which may never reach a console that is not a terminal. The counter lives on the driver's node,
    so losing a worker node loses no count; should it still be lost, the lines stop and the stage goes on.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    counter = _counter_class().options(scheduling_strategy=here).remote()
    ray.get(counter.read.remote())  # started before the stage, so its counts arrive as they are added
    started = time.monotonic()
    stop = threading.Event()
    shown: dict[str, int] = {}

    def line(counts: dict[str, int]) -> None:
        done = counts.get(key, 0)
        rate = done / max(time.monotonic() - started, 1e-9)
        others = {k: v for k, v in sorted(counts.items()) if k != key}
        out = stream or sys.stdout
        out.write(progress_line(label, done, total, unit, rate, **others) + "\n")
        out.flush()
        shown.clear()
        shown.update(counts)

    def read() -> dict[str, int] | None:
        try:
            return ray.get(counter.read.remote())
        except ray.exceptions.RayError:  # the counter is gone: no more lines, the stage is not affected
            return None

    def watch() -> None:
        throttle = Throttle(INTERVAL_S)
        while not stop.wait(min(1.0, INTERVAL_S)):
            if (counts := read()) is None:
                return
            if counts.get(key, 0) and counts != shown and throttle.due():
                line(counts)

    thread = threading.Thread(target=watch, name=f"{label}-progress", daemon=True)
    thread.start()
    try:
        yield counter
    finally:
        stop.set()
        thread.join()
        counts = read()
        if counts and counts.get(key, 0) and counts != shown:
            line(counts)
        ray.kill(counter)


# --------------------------------------------------------------------------- Ray's console output


def quiet_ray() -> int:
    """Quiet Ray's INFO chatter on the console unless verbose; return the level for ``ray.init``.

    Ray Data's console handler is replaced by ``DataWarnings`` (its file handler stays, so the detail is
    in the log files); Ray Data's non-interactive progress block is logged there at most every
    ``INTERVAL_S``. Ray Tune's new output engine prints an experiment box and result paths even at
    ``verbose=0``; its former engine, silent at ``verbose=0``, is used instead (the job prints its own
    trial progress).
    """
    if verbose():
        return logging.INFO
    os.environ.setdefault("RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL", str(int(INTERVAL_S)))
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's new engine prints its boxes at any verbosity
    import ray.data  # noqa: F401  (configures the ``ray.data`` logger)

    logger = logging.getLogger("ray.data")
    for handler in list(logger.handlers):
        if handler.get_name() == "console" or isinstance(handler, DataWarnings):
            logger.removeHandler(handler)
    logger.addHandler(DataWarnings())
    return logging.WARNING


def train_log_level() -> str:
    """Level of Ray Train's own console logs (``ray.train.LoggingConfig``): its per-report echo is INFO."""
    return "INFO" if verbose() else "WARNING"


def quiet_train_worker() -> None:
    """In a Ray Train worker, unless verbose: Ray Train's echo of every ``report`` (INFO) stays in its log.

    Ray Train 2.60 logs that echo through a logger named by its source file's path, outside ``ray.train``,
    so ``LoggingConfig(log_level=...)`` does not reach it; its level is set here instead.
    """
    if verbose():
        return
    for name in list(logging.root.manager.loggerDict):
        if "/ray/train/" in name.replace(os.sep, "/"):
            logging.getLogger(name).setLevel(logging.WARNING)


def tune_callback(total: int, label: str = "tune"):
    """A Ray Tune callback (it runs in the driver) printing trials done / total, rate and ETA, throttled."""
    from ray import tune

    class TrialProgress(tune.Callback):
        def __init__(self) -> None:
            self.done = self.failed = 0
            self.started = time.monotonic()
            self.throttle = Throttle()

        def _report(self) -> None:
            finished = self.done + self.failed
            if self.throttle.due(final=finished >= total):
                rate = finished / max(time.monotonic() - self.started, 1e-9)
                print(progress_line(label, finished, total, "trials", rate, failed=self.failed), flush=True)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.done += 1
            self._report()

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.failed += 1
            self._report()

    return TrialProgress()


# --------------------------------------------------------------------------- summaries


def summary(
    job: str,
    root: str,
    started: float,
    read: str,
    wrote: str,
    skipped: Mapping[str, int] | None = None,
    outputs: Mapping[str, str] | None = None,
    out: TextIO | None = None,
) -> dict[str, Any]:
    """Print the end-of-job summary and write it to ``<root>/summaries/<job>.json``; return it.

    ``started`` is the job's ``start()`` time, ``skipped`` counts by reason, ``outputs`` names each place
    written. The JSON is what ``chain_table`` reads: the chain's table comes from what was written.
    """
    record = {
        "job": job,
        "finished_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - started, 1),
        "read": read,
        "wrote": wrote,
        "skipped": dict(skipped or {}),
        "outputs": dict(outputs or {}),
    }
    if _logs_dir:
        record["logs"] = _logs_dir
    print(format_summary(record), file=out or sys.stdout, flush=True)
    storage.write_json(storage.join(root, SUMMARIES, f"{job}.json"), record)
    return record


def already_done(
    job: str, root: str, started: float, dataset: str, manifest: versions.Manifest
) -> dict[str, Any]:
    """The summary of a re-run that found its version committed: nothing written, and where the outputs are."""
    return summary(
        job,
        root,
        started,
        read=f"the same inputs as version {manifest.version}",
        wrote=f"nothing: version {manifest.version} ({manifest.rows} rows) was already complete",
        outputs={"version": versions.version_uri(dataset, manifest.version)},
    )


def _skipped(counts: Mapping[str, int]) -> str:
    n = sum(counts.values())
    return f"{n} ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})" if n else "none"


def format_summary(record: Mapping[str, Any]) -> str:
    """The summary block of one job: a heading, then one line per fact."""
    lines = [f"== {record['job']} done in {duration(record['seconds'])}"]
    lines += [f"  read     {record['read']}", f"  wrote    {record['wrote']}"]
    lines.append(f"  skipped  {_skipped(record['skipped'])}")
    lines += [f"  {name:<8} {uri}" for name, uri in record["outputs"].items()]
    if record.get("logs"):
        lines.append(f"  logs     {record['logs']} (Ray's detail; --verbose prints it)")
    return "\n".join(lines)


def read_summaries(root: str) -> list[dict[str, Any]]:
    """The latest summary of each job of the chain under ``root``, in chain order (jobs not run left out)."""
    found = []
    for job in JOBS:
        uri = storage.join(root, SUMMARIES, f"{job}.json")
        if storage.exists(uri):
            found.append(storage.read_json(uri))
    return found


def chain_table(records: list[Mapping[str, Any]]) -> str:
    """One table for the whole chain: job, time, tracks skipped (the reasons are in each job's summary),
    what it wrote."""
    rows = [("job", "time", "skipped", "wrote")]
    rows += [(r["job"], duration(r["seconds"]), str(sum(r["skipped"].values())), r["wrote"]) for r in records]
    rows.append(("total", duration(sum(r["seconds"] for r in records)), "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(
        ("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3]).rstrip()
        for row in rows
    )
