"""What a person watching a job sees: Ray kept quiet, one progress line per stage, a summary at the end.

- ``quiet_ray()`` (called by ``ray_env.ray_session`` before Ray starts): Ray's INFO chatter goes to its log
  files only, warnings and errors still reach the console. Ray Data's non-interactive progress (a block of
  lines every few seconds when stdout is not a terminal, e.g. in ``make logs`` of a submitted job) becomes
  one line per ``INTERVAL_S``: done / total, rate and ETA. In a terminal Ray Data draws its own tqdm bars.
  ``--verbose`` on any job (or ``MUSICLIB_VERBOSE=1``) leaves Ray as it is.
- ``Throttle`` and ``eta``: progress lines of a loop whose length is known (pretraining steps, tune trials),
  at most one per interval, and the last one always.
- ``summary(...)``: the end of every job (through ``lifecycle.Job``): what it read, wrote and skipped (and
  why), how long it took and where its outputs are; printed, and written as JSON to
  ``<root>/summaries/<job>.json`` so that ``python -m musiclib.tag.tags outputs`` (``outputs.print_outputs``) can show the whole chain
  as one table from what was written.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from musiclib.core import storage, versions

VERBOSE_ENV = "MUSICLIB_VERBOSE"
INTERVAL_S = 30.0  # seconds between two progress lines of one stage when stdout is not a terminal
JOBS = ("demo-catalog", "pretrain", "embed", "tune", "tag")  # the chain, in order
SUMMARIES = "summaries"  # <root>/summaries/<job>.json

_job = ""  # the job whose lines these are (``start``)
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


def start(job: str) -> float:
    """Name the job whose progress lines follow; return its start time (``time.perf_counter``)."""
    global _job
    _job = job
    return time.perf_counter()


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


class DataProgress(logging.Handler):
    """The console handler of the ``ray.data`` logger when not verbose.

    Records at WARNING and above are printed as Ray prints them. Ray Data's non-interactive progress block
    (a line per operator between two rulers) becomes one ``progress_line``: rows out of the last operator
    before the write, of that operator's estimated total (else of the rows read by the first), with a rate
    and an ETA; the end of an execution gives a line "finished in". Every other INFO record goes to Ray
    Data's log file only (``ray-data.log`` in the session's log folder), where its file handler writes it.
    """

    START = re.compile(r"^=+ Running Dataset")
    RULER = re.compile(r"^=+$")
    OPERATOR = re.compile(r"^(\S.*): (\d+)/(\d+|\?)$")
    FINISHED = re.compile(r"execution finished in ([\d.]+) seconds")

    def __init__(self, stream: TextIO | None = None):
        super().__init__(logging.INFO)
        self.stream = stream
        self.warnings = logging.StreamHandler(stream)
        self.warnings.setFormatter(
            logging.Formatter("%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s")
        )
        self.started: float | None = None
        self.operators: list[tuple[str, int, int]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            self.warnings.stream = self.stream or sys.stderr
            self.warnings.emit(record)
            return
        message = record.getMessage()
        if self.START.match(message):
            self.operators = []
            if self.started is None:
                self.started = time.monotonic()
        elif self.RULER.match(message):
            self._print_progress()
        elif (op := self.OPERATOR.match(message)) and op.group(1) != "Total Progress":
            total = int(op.group(3)) if op.group(3) != "?" else 0
            self.operators.append((op.group(1), int(op.group(2)), total))
        elif (finished := self.FINISHED.search(message)) and self.started is not None:
            self._print(f"{_job or 'ray data'}: finished in {duration(float(finished.group(1)))}")
            self.started = None

    def _print_progress(self) -> None:
        ops = [op for op in self.operators if not op[0].startswith("Write")]
        if not ops or self.started is None:
            return
        _, done, total = ops[-1]
        if total <= 1:  # Ray's placeholder until it can estimate the operator's output
            total = ops[0][2]
        if done == 0:
            return
        rate = done / max(time.monotonic() - self.started, 1e-9)
        self._print(progress_line(_job or "ray data", done, total, "rows", rate))

    def _print(self, line: str) -> None:
        stream = self.stream or sys.stdout
        stream.write(line + "\n")
        stream.flush()


def quiet_ray() -> int:
    """Quiet Ray's INFO chatter on the console unless verbose; return the level for ``ray.init``.

    Ray Data's console handler is replaced by ``DataProgress`` (its file handler stays, so the detail is
    in the log files). Ray Data's non-interactive progress block is logged at most every ``INTERVAL_S``.
    Ray Tune's new output engine prints an experiment box and result paths even at ``verbose=0``; its
    former engine, silent at ``verbose=0``, is used instead (the job prints its own trial progress).
    """
    if verbose():
        return logging.INFO
    os.environ.setdefault("RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL", str(int(INTERVAL_S)))
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's new engine prints its boxes at any verbosity
    import ray.data  # noqa: F401  (configures the ``ray.data`` logger)

    logger = logging.getLogger("ray.data")
    for handler in list(logger.handlers):
        if handler.get_name() == "console" or isinstance(handler, DataProgress):
            logger.removeHandler(handler)
    logger.addHandler(DataProgress())
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
