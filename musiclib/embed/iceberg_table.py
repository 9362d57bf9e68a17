"""The current embeddings of every model as one Apache Iceberg table, for engines that do not import musiclib.

A model's embeddings are a versioned dataset (``musiclib.embed.table``): which files are current is said
by its manifests and ``_latest``, and a glob over its folder also finds older versions, ``carried-*``
rewrites and checkpoints. So after each commit the embed job registers the current version's Parquet
files, in place, in the Iceberg table ``musiclib.embeddings`` (``register``): one snapshot makes the
model's files there exactly the current version's, and DuckDB, Spark or Trino read "the current
embeddings of model M" as ``model_id = 'M'``. The manifest stays the source of truth; the table follows it.

One table for every model, partitioned by ``model_id``: one name to query and a ``model_id`` to filter or
group by (a table per model would turn model ids into table names), each model's files in a partition of
their own (a reader of one model opens no other's files), and vectors of any width in one column (an
Iceberg list has no fixed length). Writers of different models contend only for the commit, and a
writer that lost the race plans again (``iceberg.commit_optimistically``).

Exactly once: the snapshot's summary carries the model and its version (``musiclib.*``), and ``register``
compares the table's files of the model with the current version's, so a run killed between its version
commit and its Iceberg commit is caught up by the next run, and a re-run that finds them equal commits
nothing. The embed job registers under the dataset's lease, and a run that lost its lease registers
nothing (``versions.check_lease``).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from pyiceberg.exceptions import NoSuchTableError
from pyiceberg.expressions import EqualTo
from pyiceberg.io.pyarrow import parquet_file_to_data_file
from pyiceberg.table import Table, Transaction
from pyiceberg.table.snapshots import Snapshot
from pyiceberg.utils.concurrent import ExecutorFactory

from musiclib.core import iceberg, storage, versions
from musiclib.core.iceberg import DEFAULT_CATALOG, masked
from musiclib.embed import table as embeddings_table

TABLE = "musiclib.embeddings"
SCHEMA = embeddings_table.schema(1, 1)  # the widths do not matter: Iceberg lists have none
MODEL_ID = "musiclib.model-id"  # snapshot summary properties: the model a snapshot registered
VERSION = "musiclib.embedding-version"  # and its version


def describe(root: str, catalog_uri: str = DEFAULT_CATALOG) -> str:
    """``musiclib.embeddings in <catalog>``, safe to print (``masked``)."""
    return f"{TABLE} in {masked(iceberg.resolved(catalog_uri, root))}"


def open_table(root: str, catalog_uri: str = DEFAULT_CATALOG, create: bool = False) -> Table | None:
    """The embeddings table of ``root``'s catalog (made when ``create``), or None when it does not exist."""
    catalog = iceberg.open_catalog(catalog_uri, root, iceberg.default_warehouse(root), create)
    if catalog is None:
        return None
    if create:
        return iceberg.create_table(catalog, TABLE, SCHEMA, partition_by=("model_id",))
    try:
        return catalog.load_table(TABLE)
    except NoSuchTableError:
        return None


def registered(table: Table, model_id: str) -> dict[str, Any]:
    """The data files of ``model_id`` in the current snapshot, by path (pyiceberg ``DataFile`` records)."""
    return {
        task.file.file_path: task.file
        for task in table.scan(row_filter=EqualTo("model_id", model_id)).plan_files()
    }


def read(table: Table, model_id: str, columns: tuple[str, ...] = ("*",)) -> pa.Table:
    """The rows of ``model_id`` in the current snapshot (what any engine reads; vectors as lists)."""
    return table.scan(row_filter=EqualTo("model_id", model_id), selected_fields=columns).to_arrow()


def register(table: Table, embeddings_root: str, model_id: str) -> Snapshot | None:
    """Commit one snapshot whose files of ``model_id`` are exactly its current version's; None when they
    already are, or when no version is committed.

    Files kept from the previous snapshot stay as they are (an incremental version's carried files are
    not read again), the previous versions' other files leave the snapshot, and files without rows are
    left out (they hold no partition value and nothing to read). Every attempt reads ``_latest`` and
    checks the lease again, so a run that lost its lease, or a stale plan, never registers an old version.
    """
    dataset = embeddings_table.dataset_uri(embeddings_root, model_id)
    added: dict[str, Any] = {}  # footers read once across attempts

    def plan() -> Transaction | None:
        versions.check_lease(dataset)
        if versions.latest_version(dataset) is None:
            return None
        manifest = versions.read_latest_manifest(dataset)
        wanted = {uri for uri, entry in zip(manifest.file_uris(), manifest.files, strict=True) if entry.rows}
        current = registered(table, model_id)
        if current.keys() == wanted:
            return None
        new = sorted(wanted - current.keys() - added.keys())
        footers = ExecutorFactory.get_or_create().map(
            lambda uri: parquet_file_to_data_file(table.io, table.metadata, uri), new
        )  # read in parallel, as pyiceberg's add_files does: on S3 each costs a round trip or two
        for uri, data_file in zip(new, footers, strict=True):
            if data_file.partition[0] != model_id:
                raise storage.StorageError(
                    f"{uri} holds rows of model {data_file.partition[0]!r}, not {model_id!r}"
                )
            added[uri] = data_file
        tx = table.transaction()
        summary = {MODEL_ID: model_id, VERSION: manifest.version}
        with tx.update_snapshot(snapshot_properties=summary).overwrite() as snapshot:
            for path in current.keys() - wanted:
                snapshot.delete_data_file(current[path])
            for uri in sorted(wanted - current.keys()):
                snapshot.append_data_file(added[uri])
        return tx

    if not iceberg.commit_optimistically(table, plan, f"the embeddings of {model_id}"):
        return None
    return table.current_snapshot()
