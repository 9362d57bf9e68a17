"""The catalog schema: one Parquet table of tracks, its validation, tag vocabulary, reads and label writes.

Columns: ``track_id`` (string, unique), ``audio_uri`` (string: absolute URI, or a path relative to the
catalog's folder), ``duration_s`` (float, optional), ``tags`` (list of strings, the human labels; empty
when unlabeled), ``split`` (``train``/``valid``/``test`` or null), and any free metadata columns.

A catalog (a job's ``--catalog``; default ``<root>/catalog/tracks.parquet``) is one of:

- a Parquet file, local or S3;
- a folder of Parquet files, local or S3, read as one table: every ``*.parquet`` under it (names starting
  with ``.`` or ``_`` left out), Hive-partitioned folders (``split=train/part-0.parquet``) giving their
  partition columns;
- an Iceberg table, ``iceberg:<namespace>.<table>``, its current snapshot, in the Iceberg catalog of the
  job's root (``MUSICLIB_TAG_CATALOG``, else the root's default: ``core.iceberg``); ``@<root>`` after the
  name names another root's. Tables with row-level deletes are refused (compact them first).

Relative ``audio_uri`` values resolve against ``base_dir``: the file's folder, the folder itself, or the
table's location. ``version`` is the catalog's identity, which the jobs' run ids digest: the table's
snapshot id, or the files' paths, sizes and ETags (local: modification times).

The human labels as every stage takes them: by track (``track_labels``), as a multi-hot matrix
(``label_matrix``); ``add_labels`` writes confirmed labels into a one-file catalog by compare-and-swap.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from musiclib.core import storage
from musiclib.core.config import ICEBERG_TABLE, ConfigError

SPLITS = ("train", "valid", "test")
REQUIRED = ("track_id", "audio_uri", "tags", "split")

SCHEMA = pa.schema(
    [
        pa.field("track_id", pa.string(), nullable=False),
        pa.field("audio_uri", pa.string(), nullable=False),
        pa.field("duration_s", pa.float64()),
        pa.field("tags", pa.list_(pa.string())),
        pa.field("split", pa.string()),
    ]
)


class CatalogError(ConfigError):
    """The catalog breaks the schema; the message lists every problem found (up to a limit).

    A ``ConfigError``: a job checks its catalog with its options, before Ray starts.
    """


def _table_name(uri: str) -> tuple[str, str] | None:
    """``(<namespace>.<table>, root)`` of a catalog ``iceberg:<namespace>.<table>@<root>``; None for
    a file or folder."""
    if not uri.startswith(ICEBERG_TABLE):
        return None
    name, _, root = uri.removeprefix(ICEBERG_TABLE).partition("@")
    namespace, _, table = name.rpartition(".")
    if not namespace or not table or not root:
        raise CatalogError(f"catalog {uri!r}: name an Iceberg table as iceberg:<namespace>.<table>")
    return name, root


def _iceberg_files(uri: str, name: str, root: str) -> tuple[int, str, list[str], pa.Schema]:
    """The current snapshot of the Iceberg table: its id, location, data files and schema.

    The files are read as Parquet, like a folder's: one reader for every kind of catalog, and the same
    file list for Ray Data. pyiceberg is imported here only, so that reading a file catalog stays light.
    """
    from pyiceberg.exceptions import NoSuchNamespaceError, NoSuchTableError

    from musiclib.core import iceberg

    where = iceberg.masked(iceberg.resolved(iceberg.DEFAULT_CATALOG, root))
    try:
        found = iceberg.open_catalog(
            iceberg.DEFAULT_CATALOG, root, storage.join(root, "tags", "warehouse"), create=False
        )
        table = None if found is None else found.load_table(name)
    except (NoSuchTableError, NoSuchNamespaceError) as exc:
        raise CatalogError(f"catalog {uri}: no table {name} in the Iceberg catalog {where}") from exc
    except Exception as exc:  # the catalog's database or service is unreachable or refuses
        raise CatalogError(f"catalog {uri}: cannot open the Iceberg catalog {where}: {exc}") from exc
    if table is None:
        raise CatalogError(
            f"catalog {uri}: no Iceberg catalog at {where}; set MUSICLIB_TAG_CATALOG to the one holding {name}"
        )
    snapshot = table.current_snapshot()
    if snapshot is None:
        raise CatalogError(f"catalog {uri}: the table has no snapshot (no tracks written yet)")
    tasks = list(table.scan(snapshot_id=snapshot.snapshot_id).plan_files())
    if any(t.delete_files for t in tasks):
        raise CatalogError(
            f"catalog {uri}: snapshot {snapshot.snapshot_id} has row-level deletes; rewrite its data files "
            f"(compaction) first"
        )
    files = sorted(storage.normalize_uri(t.file.file_path) for t in tasks)
    return snapshot.snapshot_id, storage.normalize_uri(table.location()), files, table.schema().as_arrow()


def files(uri: str) -> list[str]:
    """The Parquet files the catalog is read from, as URIs: the file, the folder's files, or the table's."""
    if table := _table_name(uri):
        return _iceberg_files(uri, *table)[2]
    return [f for f, _, _ in _file_versions(uri)]


def _file_versions(uri: str) -> list[tuple[str, int, str]]:
    try:
        found = storage.file_versions(uri, suffix=".parquet")
    except storage.NotFound as exc:
        raise CatalogError(f"catalog not found: {uri}") from exc
    except storage.StorageError as exc:
        raise CatalogError(f"cannot open catalog {uri}: {exc}") from exc
    if not found:
        raise CatalogError(f"no Parquet files in catalog folder {uri}")
    return found


def version(uri: str) -> str:
    """The catalog's identity: ``snapshot <id> of <table>`` for an Iceberg table, else a digest of its files'
    paths, sizes and ETags (local: modification times). Same catalog, same identity; a file changed, added
    or removed gives a new one, without reading the data."""
    if table := _table_name(uri):
        return f"snapshot {_iceberg_files(uri, *table)[0]} of {table[0]}"
    return hashlib.sha256(json.dumps(_file_versions(uri)).encode()).hexdigest()


def dataset(uri: str) -> pads.Dataset:
    """A lazy pyarrow dataset over the catalog (a file, a folder of files, Hive-partitioned or not, or an
    Iceberg table's current snapshot)."""
    try:
        if table := _table_name(uri):
            _, location, paths, schema = _iceberg_files(uri, *table)
            fs, _ = storage.arrow_filesystem(paths[0] if paths else location)
            return pads.dataset(
                [storage.split_uri(p)[1] for p in paths], schema=schema, filesystem=fs, format="parquet"
            )
        paths = [storage.split_uri(p)[1] for p in files(uri)]
        fs, path = storage.arrow_filesystem(uri)
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            return pads.dataset(
                paths, filesystem=fs, format="parquet", partitioning="hive", partition_base_dir=path
            )
        return pads.dataset(paths, filesystem=fs, format="parquet")
    except (FileNotFoundError, OSError, pa.ArrowInvalid) as exc:
        raise CatalogError(f"cannot open catalog {uri}: {exc}") from exc


def base_dir(uri: str) -> str:
    """Where relative ``audio_uri`` values are resolved: the file's folder, the folder, the table's location."""
    if table := _table_name(uri):
        return _iceberg_files(uri, *table)[1]
    fs, path = storage.filesystem(uri)
    return uri if fs.isdir(path) else storage.parent(uri)


def iter_batches(
    uri: str, columns: list[str] | None = None, batch_size: int = 65536
) -> Iterator[pa.RecordBatch]:
    """Stream the catalog in record batches; memory stays bounded whatever the catalog size."""
    yield from dataset(uri).to_batches(columns=columns, batch_size=batch_size)


def read(uri: str, columns: list[str] | None = None) -> pa.Table:
    """Read the whole catalog (or some columns). For small catalogs and tests; jobs stream instead."""
    return dataset(uri).to_table(columns=columns)


def labeled(table: pa.Table) -> pa.Table:
    """The rows that carry at least one tag (a null tag list is unlabeled)."""
    return table.filter(pc.fill_null(pc.greater(pc.list_value_length(table["tags"]), 0), False))


def durations(uri: str) -> np.ndarray:
    """Every row's ``duration_s`` as float64; NaN where unknown (null, no such column, or not numeric)."""
    ds = dataset(uri)
    if "duration_s" not in ds.schema.names or not _is_number(ds.schema.field("duration_s").type):
        return np.full(ds.count_rows(), np.nan)
    parts = [
        b.column(0).cast(pa.float64()).to_numpy(zero_copy_only=False)
        for b in ds.to_batches(columns=["duration_s"])
    ]
    return np.concatenate(parts) if parts else np.zeros(0)


def write(table: pa.Table, uri: str) -> None:
    """Write a catalog as one Parquet file, atomically (readers see the old file or the new one)."""
    storage.write_parquet(conform(table), uri)


def conform(table: pa.Table) -> pa.Table:
    """Cast the known columns to the schema's types, keeping extra metadata columns as they are."""
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise CatalogError(f"catalog lacks required column(s): {', '.join(missing)}")
    if "duration_s" not in table.column_names:
        table = table.append_column("duration_s", pa.nulls(len(table), pa.float64()))
    for f in SCHEMA:
        i = table.column_names.index(f.name)
        if table.schema.field(f.name).type != f.type:
            try:
                table = table.set_column(i, f.name, table.column(f.name).cast(f.type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise CatalogError(f"column {f.name!r} cannot be read as {f.type}: {exc}") from exc
    extra = [c for c in table.column_names if c not in SCHEMA.names]
    return table.select(SCHEMA.names + extra)


def _bad_uri(uri: str | None) -> str | None:
    if uri is None or not uri.strip():
        return "empty"
    try:
        storage.split_uri(uri)
    except storage.StorageError as exc:
        return str(exc)
    return None


TAG_FORBIDDEN = (",", "|", "\n", "\r", "\t")  # separators of --tags lists, report tables and lines


def bad_tag(tag: object) -> str | None:
    """Why a tag string cannot be used (None when it can): tags name columns, CLI lists and table cells."""
    if not isinstance(tag, str):
        return f"{tag!r} is not a string"
    if not tag.strip():
        return f"{tag!r} is empty"
    if tag != tag.strip():
        return f"{tag!r} has surrounding whitespace"
    if any(c in tag for c in TAG_FORBIDDEN):
        return f"{tag!r} contains one of {' '.join(repr(c) for c in TAG_FORBIDDEN)}"
    return None


def _is_number(stored: pa.DataType) -> bool:
    return pa.types.is_floating(stored) or pa.types.is_integer(stored)


def _type_problems(schema: pa.Schema) -> list[str]:
    """Columns whose stored type is not the schema's (an integer ``track_id`` is not silently cast)."""
    problems = []
    for f in SCHEMA:
        if f.name not in schema.names:
            continue
        stored = schema.field(f.name).type
        if f.name == "duration_s":
            ok = _is_number(stored) or pa.types.is_null(stored)
        elif f.name == "tags":
            ok = pa.types.is_null(stored) or (
                (pa.types.is_list(stored) or pa.types.is_large_list(stored))
                and (pa.types.is_string(stored.value_type) or pa.types.is_large_string(stored.value_type))
            )
        else:
            ok = (
                pa.types.is_string(stored)
                or pa.types.is_large_string(stored)
                or (f.name == "split" and pa.types.is_null(stored))
            )
        if not ok:
            problems.append(f"column {f.name!r} is {stored}, expected {f.type}")
    return problems


def validate(uri_or_table: str | pa.Table, vocabulary: set[str] | None = None, max_errors: int = 20) -> int:
    """Check the whole catalog, streaming; raise CatalogError listing every problem, else return the row count.

    Checks: required columns and their types, at least one track, unique non-empty track ids,
    well-formed audio URIs, known splits, usable tag strings (``bad_tag``) and, when ``vocabulary`` is
    given, tags inside it.
    """
    schema = uri_or_table.schema if isinstance(uri_or_table, pa.Table) else dataset(uri_or_table).schema
    name = "catalog" if isinstance(uri_or_table, pa.Table) else f"catalog {uri_or_table}"
    missing = [c for c in REQUIRED if c not in schema.names]
    if missing:
        raise CatalogError(f"{name} lacks required column(s): {', '.join(missing)}")
    if problems := _type_problems(schema):
        raise CatalogError(f"{name} has column(s) of the wrong type:\n  " + "\n  ".join(problems))

    def batches() -> Iterator[pa.RecordBatch]:
        if isinstance(uri_or_table, pa.Table):
            return iter(conform(uri_or_table).to_batches())
        columns = [c for c in SCHEMA.names if c in schema.names]
        return (conform(pa.Table.from_batches([b])) for b in iter_batches(uri_or_table, columns=columns))

    errors: list[str] = []
    hashes: list[np.ndarray] = []  # of every non-empty id: 8 bytes a track, not a Python string
    n = 0
    for batch in batches():
        cols = batch.to_pydict()
        hashes.append(np.array([hash(t) for t in cols["track_id"] if t], np.int64))
        for tid, auri, tags, split in zip(cols["track_id"], cols["audio_uri"], cols["tags"], cols["split"]):
            n += 1
            if len(errors) >= max_errors:
                continue
            if not tid:
                errors.append(f"row {n - 1}: empty track_id")
            if reason := _bad_uri(auri):
                errors.append(f"track {tid!r}: bad audio_uri {auri!r}: {reason}")
            if split is not None and split not in SPLITS:
                errors.append(f"track {tid!r}: unknown split {split!r} (expected one of {SPLITS} or null)")
            for tag in tags or []:
                if reason := bad_tag(tag):
                    errors.append(f"track {tid!r}: bad tag: {reason}")
            if vocabulary is not None:
                unknown = sorted(set(tags or []) - vocabulary - {None})
                if unknown:
                    errors.append(f"track {tid!r}: tag(s) outside the vocabulary: {', '.join(unknown)}")
    if n == 0:
        errors.append("no tracks")
    errors += _duplicates(batches, np.concatenate(hashes) if hashes else np.zeros(0, np.int64))
    errors = errors[:max_errors]
    if errors:
        more = " (first errors only)" if len(errors) >= max_errors else ""
        raise CatalogError(f"{len(errors)} problem(s) in the {name}{more}:\n  " + "\n  ".join(errors))
    return n


def _duplicates(batches: Callable[[], Iterator[pa.RecordBatch]], hashes: np.ndarray) -> list[str]:
    """``row i: duplicate track_id`` for each repeated id: ids whose hashes repeat are compared exactly in a
    second pass, which only a catalog with a repeated hash needs."""
    ordered = np.sort(hashes)
    repeated = set(ordered[1:][ordered[1:] == ordered[:-1]].tolist())
    if not repeated:
        return []
    errors, seen, n = [], set(), 0
    for batch in batches():
        for tid in batch.column("track_id").to_pylist():
            n += 1
            if tid and hash(tid) in repeated:
                if tid in seen:
                    errors.append(f"row {n - 1}: duplicate track_id {tid!r}")
                seen.add(tid)
    return errors


@dataclass
class Vocabulary:
    """Tags with their label counts, most frequent first; head tags are the most frequent ones."""

    counts: dict[str, int]
    head: list[str]
    tail: list[str]

    @property
    def tags(self) -> list[str]:
        return list(self.counts)


def vocabulary(
    uri_or_table: str | pa.Table, split: str | None = "train", head_fraction: float = 0.2
) -> Vocabulary:
    """Count tags over labeled tracks (of one split, or all when ``split`` is None), streaming.

    The head is the top ``head_fraction`` of tags by label count (at least one tag); the rest is the
    long tail, where few-shot probes matter most.
    """
    counter: Counter[str] = Counter()
    if isinstance(uri_or_table, pa.Table):
        batches = iter(uri_or_table.select(["tags", "split"]).to_batches())
    else:
        batches = iter_batches(uri_or_table, columns=["tags", "split"])
    for batch in batches:
        cols = batch.to_pydict()
        for tags, s in zip(cols["tags"], cols["split"]):
            if split is None or s == split:
                counter.update(set(tags or []))
    ordered = dict(sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))
    names = list(ordered)
    n_head = max(1, round(head_fraction * len(names))) if names else 0
    return Vocabulary(counts=ordered, head=names[:n_head], tail=names[n_head:])


# --------------------------------------------------------------------------- human labels


def track_labels(uri: str) -> dict[str, list[str]]:
    """Every catalog track's human labels, by track id."""
    table = read(uri, columns=["track_id", "tags"])
    return dict(zip(table["track_id"].to_pylist(), (t or [] for t in table["tags"].to_pylist())))


def label_matrix(tag_lists: Sequence[Sequence[str] | None], tags: Sequence[str]) -> np.ndarray:
    """``[n_tracks, n_tags]`` boolean matrix from per-track tag lists; tags outside ``tags`` are ignored."""
    column = {t: j for j, t in enumerate(tags)}
    y = np.zeros((len(tag_lists), len(tags)), dtype=bool)
    for i, track_tags in enumerate(tag_lists):
        for t in track_tags or ():
            j = column.get(t)
            if j is not None:
                y[i, j] = True
    return y


@dataclass
class LabelChange:
    """What ``add_labels`` did: tracks that got the tag, tracks that had it, tracks given a split."""

    added: list[str]
    already: list[str]
    split_set: list[str]


def with_label(
    table: pa.Table, tag: str, track_ids: Sequence[str], split: str
) -> tuple[pa.Table, LabelChange]:
    """``table`` (a catalog) with ``tag`` added to the tags of ``track_ids``; tracks without a split get
    ``split``, so that tune uses the label. Every other column and row is kept as it was."""
    if reason := bad_tag(tag):
        raise CatalogError(f"bad tag: {reason}")
    if split not in SPLITS:
        raise CatalogError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    wanted = set(track_ids)
    ids = table["track_id"].to_pylist()
    unknown = sorted(wanted - set(ids))
    if unknown:
        raise CatalogError(f"track {unknown[0]!r} is not in the catalog ({len(unknown)} unknown id(s))")
    tags = table["tags"].to_pylist()
    splits = table["split"].to_pylist()
    change = LabelChange([], [], [])
    for i, t in enumerate(ids):
        if t not in wanted:
            continue
        if tag in (tags[i] or []):
            change.already.append(t)
        else:
            tags[i] = [*(tags[i] or []), tag]
            change.added.append(t)
        if splits[i] is None:
            splits[i] = split
            change.split_set.append(t)
    table = table.set_column(
        table.column_names.index("tags"), "tags", pa.array(tags, table.schema.field("tags").type)
    )
    table = table.set_column(
        table.column_names.index("split"), "split", pa.array(splits, table.schema.field("split").type)
    )
    return table, change


def add_labels(uri: str, tag: str, track_ids: Sequence[str], split: str = "train") -> LabelChange:
    """Label ``track_ids`` with ``tag`` in the catalog file, atomically and without losing concurrent edits.

    Read, change, then ``storage.replace_if_unchanged``: when another writer changed the catalog in
    between, read it again and redo the change. The tune and tag jobs read the new labels on their next
    run. Nothing is written when an id is unknown, the tag is unusable, or every track already has it.
    """
    if _table_name(uri):
        raise CatalogError(f"catalog {uri} is an Iceberg table: labels are written to one-file catalogs only")
    fs, path = storage.filesystem(uri)
    if fs.isdir(path):
        raise CatalogError(f"catalog {uri} is a folder: labels are written to one-file catalogs only")
    for _ in range(20):
        body = storage.read_bytes(uri)
        table, change = with_label(pq.read_table(pa.BufferReader(body)), tag, track_ids, split)
        if not change.added and not change.split_set:
            return change
        sink = pa.BufferOutputStream()
        pq.write_table(conform(table), sink, compression="zstd")
        if storage.replace_if_unchanged(uri, body, sink.getvalue().to_pybytes()):
            return change
    raise storage.StorageError(f"catalog {uri} kept changing while labels were added; try again")
