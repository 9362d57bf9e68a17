"""The Iceberg catalog musiclib's tables live in: chosen by one URI, shared by every stage that writes a table.

The catalog (``--catalog-uri``, else ``MUSICLIB_TAG_CATALOG``):

- empty, local root: a SQLite file under the root, ``sqlite:///<root>/tags/iceberg.db``;
- empty, S3 root: refused (``shared_catalog_problem``): a SQLite file on the driver's disk would be lost
  with the machine (a KubeRay head pod's restart) and unseen by Trino or Athena;
- ``http://…`` or ``https://…``: an Iceberg REST catalog; ``glue``: AWS Glue; any other URI is a
  SQLAlchemy URL: ``postgresql://…`` (through psycopg 3, the ``postgres`` extra), or ``sqlite:///…``,
  a deliberate choice of one machine.

S3 settings come from the standard AWS variables; credentials are found by the AWS SDK on the machine
that uses them and never pass through musiclib. A catalog's own secrets (a REST token, say) go in
pyiceberg's variables, ``PYICEBERG_CATALOG__MUSICLIB__<PROPERTY>``; a password inside the URI is never
printed (``masked``).

Its tables (``musiclib.tags``, ``musiclib.embeddings``) keep their Iceberg files in one warehouse under the
root (``default_warehouse``), are made in one commit with a name mapping (``create_table``: their Parquet
files carry no field ids), and commit optimistically (``commit_optimistically``).
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Callable

import pyarrow as pa
from pyiceberg.catalog import Catalog, load_catalog
from pyiceberg.exceptions import (
    CommitFailedException,
    NoSuchTableError,
    TableAlreadyExistsError,
    ValidationException,
)
from pyiceberg.table import Table, Transaction
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError

from musiclib.core import storage

DEFAULT_CATALOG = os.environ.get("MUSICLIB_TAG_CATALOG", "")
CATALOG_NAME = "musiclib"  # pyiceberg reads PYICEBERG_CATALOG__MUSICLIB__* for this catalog
NAME_MAPPING = "schema.name-mapping.default"  # how engines read Parquet files written without field ids
COMMIT_ATTEMPTS = 8  # optimistic commits planned again after a concurrent writer won


def default_warehouse(root: str) -> str:
    """``<root>/tags/warehouse``: where the catalog's tables under ``root`` keep their Iceberg files."""
    return storage.join(root, "tags", "warehouse")


def shared_catalog_problem(catalog_uri: str, root: str) -> str | None:
    """Why ``root``'s tables would have no catalog other machines and engines see, or None: an S3 root
    needs one named (a local root's default SQLite file lives beside its data)."""
    if catalog_uri or storage.split_uri(root)[0] != "s3":
        return None
    return (
        f"the S3 root {root} needs a shared Iceberg catalog: pass --catalog-uri postgresql://user@host/db, "
        f"an Iceberg REST URI (https://...) or glue, or set MUSICLIB_TAG_CATALOG "
        f"(sqlite:///path/iceberg.db only for one machine)"
    )


def resolved(catalog_uri: str, root: str) -> str:
    """The catalog URI in use: the one given, else a local root's SQLite file (an S3 root must name one)."""
    if problem := shared_catalog_problem(catalog_uri, root):
        raise storage.StorageError(problem)
    return catalog_uri or "sqlite:///" + os.path.join(storage.split_uri(root)[1], "tags", "iceberg.db")


def sql_url(catalog_uri: str) -> URL:
    """The SQLAlchemy URL of a SQL catalog; plain ``postgresql://`` goes through psycopg 3, not psycopg2."""
    url = make_url(catalog_uri)
    return url.set(drivername="postgresql+psycopg") if url.drivername == "postgresql" else url


def catalog_problem(catalog_uri: str) -> str | None:
    """Why a ``--catalog-uri`` names no catalog, or None. A value with ``@`` (maybe a password) is not echoed."""
    if catalog_uri in ("", "glue") or catalog_uri.startswith(("http://", "https://")):
        return None
    shown = "a value with '@'" if "@" in catalog_uri else repr(catalog_uri)
    try:
        url = sql_url(catalog_uri)
        url.get_dialect().import_dbapi()
    except (ArgumentError, NoSuchModuleError):
        return (
            f"--catalog-uri must be https://... (a REST catalog), glue, or a SQLAlchemy URL such as "
            f"sqlite:///path/iceberg.db or postgresql://host/db; got {shown}"
        )
    except ImportError as exc:
        extra = " (pip install 'musiclib-tagger[postgres]')" if url.get_backend_name() == "postgresql" else ""
        return f"--catalog-uri {masked(catalog_uri)} needs the Python module {exc.name}{extra}"
    return None


def masked(catalog_uri: str) -> str:
    """A catalog URI with the password of a SQLAlchemy URL replaced by ``***``."""
    if "://" in catalog_uri and not catalog_uri.startswith(("http://", "https://")):
        return make_url(catalog_uri).render_as_string(hide_password=True)
    return catalog_uri


def open_catalog(catalog_uri: str, root: str, warehouse: str, create: bool) -> Catalog | None:
    """The pyiceberg catalog for ``root`` with its data under ``warehouse``; None for a SQLite catalog whose
    file does not exist and is not to be made."""
    uri = resolved(catalog_uri, root)
    props: dict[str, str] = {"warehouse": warehouse}
    if uri.startswith(("http://", "https://")):
        props |= {"type": "rest", "uri": uri}
    elif uri == "glue":
        props |= {"type": "glue"}
    else:
        props |= {"type": "sql", "uri": sql_url(uri).render_as_string(hide_password=False)}
        if uri.startswith("sqlite:///"):
            path = make_url(uri).database or ""
            if not create and not os.path.exists(path):
                return None
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if storage.split_uri(root)[0] == "s3":
        s3 = storage.s3_settings()  # endpoint and region only: credentials stay with the AWS SDK
        props |= {k: v for k, v in (("s3.endpoint", s3["endpoint_url"]), ("s3.region", s3["region"])) if v}
    try:
        return load_catalog(CATALOG_NAME, **props)
    except OperationalError as exc:  # a database that is down, or refuses the user: one line, no password
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        raise storage.StorageError(f"cannot open the Iceberg catalog {masked(uri)}: {reason}") from None


def owned(table: Table, warehouse: str) -> Table:
    """``table`` when its files live under ``warehouse``; else an error: in a catalog shared by several roots,
    a table of the same name made for another root is not this root's (a run would replace its rows)."""
    location = table.location().removeprefix("file://")
    if not location.startswith(warehouse.rstrip("/") + "/"):
        name = ".".join(table.name())
        raise storage.StorageError(
            f"the table {name} in this catalog belongs to another root (its files are under {location}, not "
            f"{warehouse}): give this root its own table with --table <namespace>.<name>"
        )
    return table


def create_table(catalog: Catalog, name: str, schema: pa.Schema, partition_by: tuple[str, ...] = ()) -> Table:
    """The table ``name``, created when missing, in one commit, with identity partitions on ``partition_by``
    and a name mapping, so engines read Parquet files written without Iceberg field ids by column name.

    Of two writers that create it at once, one creates it and the other loads it.
    """
    catalog.create_namespace_if_not_exists(name.rpartition(".")[0])
    try:
        return catalog.load_table(name)
    except NoSuchTableError:
        pass
    tx = catalog.create_table_transaction(name, schema)
    if partition_by:
        with tx.update_spec() as spec:
            for column in partition_by:
                spec.add_identity(column)
    tx.set_properties(**{NAME_MAPPING: tx.table_metadata.schema().name_mapping.model_dump_json()})
    with contextlib.suppress(TableAlreadyExistsError, CommitFailedException):  # made by another writer
        tx.commit_transaction()
    return catalog.load_table(name)


def commit_optimistically(table: Table, plan: Callable[[], Transaction | None], what: str) -> bool:
    """Commit the transaction ``plan`` makes from the table's current snapshot; False when it makes none.

    Iceberg commits are optimistic: when another writer commits first, the table is refreshed and
    ``plan`` called again on the new current snapshot, up to ``COMMIT_ATTEMPTS`` times with backoff.
    """
    attempt = 0
    while True:
        attempt += 1
        table.refresh()
        tx = plan()
        if tx is None:
            return False
        try:
            tx.commit_transaction()
            return True
        except (CommitFailedException, ValidationException) as exc:
            if attempt == COMMIT_ATTEMPTS:
                raise storage.StorageError(
                    f"{what} could not commit to {table.name()} after {attempt} attempts: {exc}"
                ) from exc
            time.sleep(random.uniform(0.05, 0.2) * 2**attempt)
