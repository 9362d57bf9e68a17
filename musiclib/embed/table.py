"""The embeddings table the later stages read: its schema, where it lives, its rows as a matrix (no torch).

``<root>/embeddings/<model_id>/`` is a versioned dataset (see ``versions``) whose latest manifest lists
every Parquet file of the current, complete set (``files``, ``read``). One row per catalog track
(``schema``): ``track_id``, ``embedding`` (fixed-size list of float32: the encoder's output averaged over
the track's chunks), ``logmel`` (fixed-size list of float32, ``2 * n_mels`` values: each log-mel band's
mean, then its standard deviation, over every frame of the same chunks; ``musiclib.embed.logmel``),
``n_chunks``, ``duration_s``, ``model_id``, ``error`` (the reason the track could not be embedded, null
when fine; both vectors are null then). Tables written before the embed job computed the statistics have
no ``logmel`` column; they stay readable, and offer only the learned embedding (``offered``).

The embed stage (``embedder``) writes it; probes, tags, suggestions and the index read it, keep the
``usable`` rows and take their vectors as one ``matrix`` in a representation (``REPRESENTATIONS``): the
learned ``embedding``, the ``logmel`` statistics, or both side by side (``fused``).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from musiclib.core import storage, versions
from musiclib.core.config import ConfigError

LOGMEL = "logmel"  # the column of the log-mel statistics
REPRESENTATIONS = ("embedding", "logmel", "fused")  # what a probe reads: the learned, the floor, both
COLUMNS = {"embedding": ["embedding"], "logmel": [LOGMEL], "fused": ["embedding", LOGMEL]}


def schema(dim: int, logmel_dim: int = 0) -> pa.Schema:
    """The schema for ``dim``-d embeddings, with a ``logmel`` column of ``logmel_dim`` values (none for 0)."""
    vectors = [pa.field("embedding", pa.list_(pa.float32(), dim))]
    if logmel_dim:
        vectors.append(pa.field(LOGMEL, pa.list_(pa.float32(), logmel_dim)))
    return pa.schema(
        [
            pa.field("track_id", pa.string(), nullable=False),
            *vectors,
            pa.field("n_chunks", pa.int32()),
            pa.field("duration_s", pa.float64()),
            pa.field("model_id", pa.string()),
            pa.field("error", pa.string()),
        ]
    )


def from_decoded(
    decoded: pa.Table, model_id: str, embedding: np.ndarray, logmel: np.ndarray | None = None
) -> pa.Table:
    """Rows of decoded tracks (``track_id``, ``n_chunks``, ``duration_s``, ``error``) with their vectors
    ``[rows, dim]``, each vector null where ``error`` is set."""
    failed = decoded.column("error").is_valid().combine_chunks()
    vectors = {"embedding": embedding} | ({} if logmel is None else {LOGMEL: logmel})
    columns = {
        name: pa.FixedSizeListArray.from_arrays(
            pa.array(x.reshape(-1), pa.float32()), x.shape[1], mask=failed
        )
        for name, x in vectors.items()
    }
    return pa.table(
        {
            "track_id": decoded.column("track_id"),
            **columns,
            "n_chunks": decoded.column("n_chunks"),
            "duration_s": decoded.column("duration_s"),
            "model_id": pa.array([model_id] * len(decoded), pa.string()),
            "error": decoded.column("error"),
        },
        schema=schema(embedding.shape[1], 0 if logmel is None else logmel.shape[1]),
    )


def dataset_uri(embeddings_root: str, model_id: str) -> str:
    """``<embeddings_root>/<model_id>``: one versioned dataset per model."""
    return storage.join(embeddings_root, model_id)


def files(embeddings_root: str, model_id: str) -> list[str]:
    """URIs of the Parquet files of the latest committed embedding set of a model."""
    return versions.read_latest_manifest(dataset_uri(embeddings_root, model_id)).file_uris()


def read(embeddings_root: str, model_id: str, columns: list[str] | None = None) -> pa.Table:
    """The latest committed embeddings of a model as one table (probes fit on these; jobs stream instead)."""
    uris = files(embeddings_root, model_id)
    if not uris:
        raise storage.StorageError(f"embeddings of {model_id} under {embeddings_root} hold no files")
    return storage.read_parquet(uris, columns)


def publish_table(embeddings_root: str, model_id: str, version: str, table: pa.Table) -> versions.Manifest:
    """Publish ``table`` as one version of a model's embeddings, in one shard (synthetic data, small imports).

    The embed job writes many shards itself and publishes them the same way (``versions.publish``).
    """
    dataset = dataset_uri(embeddings_root, model_id)
    uri = storage.join(versions.version_uri(dataset, version), "part-00000.parquet")
    return versions.publish(dataset, version, [uri], [storage.write_parquet(table, uri)])


# --------------------------------------------------------------------------- representations


def offered(uris: list[str]) -> tuple[str, ...]:
    """The representations embedding files offer, from the first file's schema (a version's files share
    one): every one with a ``logmel`` column, else the learned embedding alone."""
    if uris and LOGMEL in storage.parquet_schema(uris[0]).names:
        return REPRESENTATIONS
    return ("embedding",)


def require(representation: str, offers: tuple[str, ...] | list[str], what: str) -> None:
    """A one-line ``ConfigError`` when ``what`` (embeddings, named in the message) lack ``representation``."""
    if representation not in REPRESENTATIONS:
        raise ConfigError(f"unknown representation {representation!r}; expected one of {REPRESENTATIONS}")
    if representation not in offers:
        raise ConfigError(
            f"{what} have no {LOGMEL} column (written before the embed job computed the log-mel "
            f"statistics), which representation {representation!r} needs: run embed with --only-new false"
        )


def columns(representation: str) -> list[str]:
    """What a reader of ``representation`` reads: ``track_id``, its vector columns, ``error``."""
    return ["track_id", *COLUMNS[representation], "error"]


def usable_mask(table: pa.Table) -> pa.ChunkedArray:
    """Whether each row has no error and every vector column the table holds (a null one: no vector)."""
    mask = pc.is_null(table["error"])
    for name in ("embedding", LOGMEL):
        if name in table.column_names:
            mask = pc.and_(mask, pc.is_valid(table[name]))
    return mask


def usable(table: pa.Table) -> pa.Table:
    """The rows with their vectors and no error, in their order."""
    return table.filter(usable_mask(table))


def matrix(table: pa.Table, representation: str = "embedding") -> np.ndarray:
    """The vectors of rows that all have them (``usable``) as a float32 matrix ``[n, dim]``: the learned
    ``embedding``, the ``logmel`` statistics, or both side by side (``fused``: the embedding first)."""
    require(representation, REPRESENTATIONS if LOGMEL in table.column_names else ("embedding",), "these rows")
    parts = [_vectors(table[name]) for name in COLUMNS[representation]]
    return parts[0] if len(parts) == 1 else np.hstack(parts)


def _vectors(column: pa.ChunkedArray) -> np.ndarray:
    column = column.combine_chunks()
    flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    if pa.types.is_fixed_size_list(column.type):
        return flat.reshape(len(column), column.type.list_size)
    return flat.reshape(len(column), -1 if len(column) else 0)
