"""One way every job starts and ends: named when it starts, summarised when it ends, its result returned.

A job's ``run(cfg)`` opens a ``Job`` first (its clock starts) and returns through ``Job.done`` or
``Job.already_complete``: the summary is printed and written to ``<root>/summaries/<job>.json``
(``progress.summary``), and the ``Summary`` returned carries the job's result (a model id, a manifest, a
snapshot) for its caller, the study or a test. A job's ``main(argv)`` parses its
config and returns ``run(cfg).result``.

    def run(cfg: TuneConfig) -> Summary[versions.Manifest]:
        job = Job("tune", cfg.root)
        ...
        if (done := job.already_complete(dataset, version)) is not None:
            return done
        ...
        return job.done(manifest, read="...", wrote="...", skipped=reasons, outputs={"report": uri})
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from musiclib.core import progress, versions

T = TypeVar("T")


@dataclass(frozen=True)
class Summary(Generic[T]):
    """The end of one job: its result for the caller and its summary as printed and written (``record``)."""

    result: T
    record: dict[str, Any]


class Job:
    """One run of a job under ``root``: named when it starts, summarised once when it ends."""

    def __init__(self, name: str, root: str) -> None:
        self.name, self.root = name, root
        self.started = time.perf_counter()

    def done(
        self,
        result: T,
        read: str,
        wrote: str,
        skipped: Mapping[str, int] | None = None,
        outputs: Mapping[str, str] | None = None,
    ) -> Summary[T]:
        """The end of a run that did its work: what it read, wrote and skipped (counts by reason), where
        its outputs are, and its result."""
        record = progress.summary(self.name, self.root, self.started, read, wrote, skipped, outputs)
        return Summary(result, record)

    def already_complete(self, dataset: str, version: str) -> Summary[versions.Manifest] | None:
        """The end of a re-run whose version is committed (made current, nothing written); None otherwise."""
        manifest = versions.already_complete(dataset, version, self.name)
        if manifest is None:
            return None
        return Summary(manifest, progress.already_done(self.name, self.root, self.started, dataset, manifest))
