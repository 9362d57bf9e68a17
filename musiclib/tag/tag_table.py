"""The tag table as an Apache Iceberg table: one snapshot per tag run, readable by any Iceberg engine.

Spark, Trino, Athena and DuckDB read Iceberg, so the tag job publishes its rows as an Iceberg table
(``musiclib.tags`` by default) through pyiceberg. A tag run writes its Parquet data files first, then
commits one snapshot that lists them: readers see the previous snapshot or the new one, never a
half-written run, and the files of a run killed before its commit are never read. A full run replaces
every data file; ``--only-new`` keeps the model files of the same probe run as they are and adds the
new tracks' files. Each snapshot's summary carries the run's id and provenance (``musiclib.*``
properties), so a re-run with the same inputs finds its snapshot and writes nothing, and earlier runs
stay readable by snapshot (time travel).

Layout: the table's sort order is ``tag``, and each model file holds one row group per tag, in tag order
(``tags.write_model_rows``). A one-tag query (``top``) then reads one row group of each file, pruned by
the row groups' statistics: one file per task keeps the commit small and the files few, where a partition
on ``tag`` would split every task's file into one per tag (docs/BENCHMARKS.md, "tag at scale"). Files of
the older track-major layout stay readable: only the pruning is lost.

The catalog is chosen by ``--catalog-uri`` (``musiclib.core.iceberg``). The data and metadata files live
under ``<root>/tags/warehouse`` (the catalog's warehouse).
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
from pyiceberg.catalog import Catalog
from pyiceberg.exceptions import NoSuchTableError
from pyiceberg.expressions import BooleanExpression
from pyiceberg.io.pyarrow import ArrowScan, parquet_file_to_data_file
from pyiceberg.table import ALWAYS_TRUE, Table, Transaction
from pyiceberg.transforms import IdentityTransform

from musiclib.core import iceberg, storage
from musiclib.core.iceberg import DEFAULT_CATALOG, masked

DEFAULT_TABLE = "musiclib.tags"
PREFIX = "musiclib."  # snapshot summary properties musiclib writes
RUN_ID = PREFIX + "run-id"
SORTED_BY = "tag"  # the table's sort order: the column each data file's row groups follow
FILES_AT_ONCE = 16  # data files a streaming read has in flight (``batches``)


@dataclass(frozen=True)
class Where:
    """Which table: the root (its warehouse), the catalog URI (empty: the default) and the table name."""

    root: str
    catalog_uri: str = DEFAULT_CATALOG
    table: str = DEFAULT_TABLE

    @property
    def warehouse(self) -> str:
        return iceberg.default_warehouse(self.root)

    def resolved_catalog(self) -> str:
        """The catalog URI in use: the one given, else the root's default (``iceberg.resolved``)."""
        return iceberg.resolved(self.catalog_uri, self.root)

    def describe(self) -> str:
        """``<table> in <catalog>``, safe to print (``masked``)."""
        return f"{self.table} in {masked(self.resolved_catalog())}"


@dataclass(frozen=True)
class Run:
    """One tag run as the table records it: its snapshot and the ``musiclib.*`` summary properties."""

    run_id: str
    snapshot_id: int
    parent_id: int | None
    committed_at: str
    rows: int
    properties: dict[str, str]

    @classmethod
    def of(cls, snapshot: Any) -> Run:
        summary = snapshot.summary.additional_properties if snapshot.summary else {}
        at = _dt.datetime.fromtimestamp(snapshot.timestamp_ms / 1000, _dt.UTC)
        return cls(
            run_id=summary.get(RUN_ID, ""),
            snapshot_id=snapshot.snapshot_id,
            parent_id=snapshot.parent_snapshot_id,
            committed_at=at.isoformat(timespec="milliseconds"),
            rows=int(summary.get("total-records", 0)),
            properties={k.removeprefix(PREFIX): v for k, v in summary.items() if k.startswith(PREFIX)},
        )


def _catalog(where: Where, create: bool) -> Catalog | None:
    """The pyiceberg catalog; None for a SQLite catalog whose file does not exist and is not to be made."""
    return iceberg.open_catalog(where.catalog_uri, where.root, where.warehouse, create)


def open_table(where: Where, create_with: pa.Schema | None = None) -> Table | None:
    """The tag table, or None when it does not exist yet; with ``create_with`` it is made with that schema.

    A table opened with ``create_with`` gets a name mapping, so the Parquet files the tag job writes (plain
    Arrow schemas, without Iceberg field ids) are read by column name, and the sort order ``SORTED_BY``
    (a table made before it gets it on its next run; a metadata change, no snapshot).
    """
    catalog = _catalog(where, create=create_with is not None)
    if catalog is None:
        return None
    if create_with is None:
        try:
            return iceberg.owned(catalog.load_table(where.table), where.warehouse)
        except NoSuchTableError:
            return None
    table = iceberg.create_table(catalog, where.table, create_with)
    unnamed, unsorted = table.metadata.name_mapping() is None, table.sort_order().is_unsorted
    if unnamed or unsorted:  # a table made before musiclib set them
        with table.transaction() as tx:
            if unnamed:
                tx.set_properties(**{iceberg.NAME_MAPPING: table.schema().name_mapping.model_dump_json()})
            if unsorted:
                with tx.update_sort_order() as order:
                    order.asc(SORTED_BY, IdentityTransform())
    return iceberg.owned(table, where.warehouse)


def require_table(where: Where) -> Table:
    """The tag table; a clear error naming the table and catalog when nothing was tagged yet."""
    table = open_table(where)
    if table is None or table.current_snapshot() is None:
        raise storage.StorageError(f"no tag table {where.describe()} yet: run the tag job first")
    return table


def runs(table: Table) -> list[Run]:
    """Every snapshot of the table, oldest first: the tag runs it holds (time travel by ``snapshot_id``)."""
    return [Run.of(s) for s in sorted(table.metadata.snapshots, key=lambda s: s.timestamp_ms)]


def current_run(table: Table) -> Run | None:
    snapshot = table.current_snapshot()
    return None if snapshot is None else Run.of(snapshot)


def find_run(table: Table, run_id: str) -> Run | None:
    """The snapshot committed by run ``run_id``, or None when that run never committed."""
    return next((r for r in runs(table) if r.run_id == run_id), None)


def already_complete(table: Table, run_id: str, job: str) -> Run | None:
    """The snapshot of ``run_id`` when that run committed (a re-run with the same inputs: nothing to do)."""
    run = find_run(table, run_id)
    if run is not None:
        current = current_run(table)
        where = (
            "it is the current snapshot"
            if current and current.snapshot_id == run.snapshot_id
            else f"the current snapshot is the newer run {current.run_id if current else None}"
        )
        print(
            f"{job}: run {run_id} is already complete (snapshot {run.snapshot_id} of {table.name()}); {where}"
        )
    return run


def run_dir(table: Table, run_id: str) -> str:
    """Where run ``run_id`` writes its data files (a killed attempt's leftovers there are never committed)."""
    return storage.join(table.location(), "data", run_id)


def data_files(table: Table, snapshot_id: int | None = None) -> list[Any]:
    """The data files of a snapshot (default: the current one), as pyiceberg ``DataFile`` records."""
    return [task.file for task in table.scan(snapshot_id=snapshot_id).plan_files()]


def read(
    table: Table,
    row_filter: str | BooleanExpression = ALWAYS_TRUE,
    columns: tuple[str, ...] = ("*",),
    snapshot_id: int | None = None,
) -> pa.Table:
    """Rows of a snapshot (default: the current one), filtered and projected by the scan itself."""
    return table.scan(row_filter=row_filter, selected_fields=columns, snapshot_id=snapshot_id).to_arrow()


def batches(
    table: Table,
    row_filter: str | BooleanExpression = ALWAYS_TRUE,
    columns: tuple[str, ...] = ("*",),
    snapshot_id: int | None = None,
) -> Iterator[pa.RecordBatch]:
    """``read``, streamed: ``FILES_AT_ONCE`` data files at a time, so memory follows the files in flight,
    not the snapshot (pyiceberg's own batch reader submits every file at once and holds what it read)."""
    scan = table.scan(row_filter=row_filter, selected_fields=columns, snapshot_id=snapshot_id)
    tasks = list(scan.plan_files())
    reader = ArrowScan(scan.table_metadata, scan.io, scan.projection(), scan.row_filter, scan.case_sensitive)
    for i in range(0, len(tasks), FILES_AT_ONCE):
        yield from reader.to_record_batches(tasks[i : i + FILES_AT_ONCE])


def commit(
    table: Table,
    run_id: str,
    files: list[str],
    properties: dict[str, Any],
    keep: frozenset[str] = frozenset(),
) -> Run:
    """Commit one snapshot whose rows are ``files`` (already written) plus the current files in ``keep``.

    Every other current data file leaves the snapshot. Iceberg commits optimistically; when another
    writer commits first, pyiceberg retries and checks the conflict, and here the snapshot is planned
    again against the new current one (a full run replaces it; a run whose ``keep`` files are gone
    fails, since what it scored depended on them), so no writer's snapshot is lost.
    """
    added = [parquet_file_to_data_file(table.io, table.metadata, f) for f in files]
    summary = {RUN_ID: run_id} | {PREFIX + k: str(v) for k, v in properties.items()}

    def plan() -> Transaction | None:
        if find_run(table, run_id) is not None:  # an attempt whose answer was lost did land
            return None
        current = {f.file_path: f for f in data_files(table)}
        if missing := keep - current.keys():
            raise storage.StorageError(
                f"the tag table {table.name()} changed during run {run_id}: {len(missing)} data file(s) it "
                f"keeps are gone from the current snapshot; run it again"
            )
        tx = table.transaction()
        with tx.update_snapshot(snapshot_properties=summary).overwrite() as snapshot:
            for path, data_file in current.items():
                if path not in keep:
                    snapshot.delete_data_file(data_file)
            for data_file in added:
                snapshot.append_data_file(data_file)
        return tx

    iceberg.commit_optimistically(table, plan, f"run {run_id}")
    landed = find_run(table, run_id)
    assert landed is not None, "a committed run is in the table's history"
    return landed


def verify(table: Table, snapshot_id: int | None = None) -> list[str]:
    """Problems with a snapshot's data files (missing, or not the size and rows the table records)."""
    problems = []
    for f in data_files(table, snapshot_id):
        uri = f.file_path.removeprefix("file://")
        if not storage.exists(uri):
            problems.append(f"missing: {uri}")
            continue
        fs, path = storage.filesystem(uri)
        if fs.size(path) != f.file_size_in_bytes or storage.parquet_rows(uri) != f.record_count:
            problems.append(f"size or rows differ from the table: {uri}")
    return problems


def sql(table: Table, query: str, snapshot_id: int | None = None) -> pa.Table:
    """Run DuckDB SQL over a snapshot (default: the current one), registered as the view ``tags``.

    pyiceberg lists the snapshot's data files; DuckDB scans them as an Arrow dataset (local or S3, through
    ``storage``, so nothing needs DuckDB's downloadable extensions), pushing the query's columns and
    filters into the scan, so a query reads what it needs, not the snapshot. A snapshot with delete files
    (written by another engine) is read whole by pyiceberg, which applies them.
    """
    import duckdb  # only this command needs it: the tag job and its Ray workers do not import it

    con = duckdb.connect()
    tasks = list(table.scan(snapshot_id=snapshot_id).plan_files())
    if not tasks or any(t.delete_files for t in tasks):
        con.register("tags", read(table, snapshot_id=snapshot_id))
    else:
        fs, _ = storage.arrow_filesystem(tasks[0].file.file_path)
        paths = [storage.split_uri(t.file.file_path)[1] for t in tasks]
        con.register("tags", ds.dataset(paths, filesystem=fs, format="parquet"))
    return con.sql(query).to_arrow_table()


def config_properties(config: dict[str, Any]) -> str:
    """A run's config as JSON for its snapshot summary, with the catalog URI's password masked."""
    masked_uri = {"catalog_uri": masked(config["catalog_uri"])} if config.get("catalog_uri") else {}
    return json.dumps(config | masked_uri, sort_keys=True, default=str)
