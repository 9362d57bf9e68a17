"""The embeddings table the later stages read: its schema, where it lives, its rows as a matrix (no torch).

``<root>/embeddings/<model_id>/`` is a versioned dataset (see ``versions``) whose latest manifest lists
every Parquet file of the current, complete set (``files``, ``read``). One row per catalog track
(``schema``): ``track_id``, ``embedding`` (fixed-size list of float32; null when ``error`` is set),
``n_chunks``, ``duration_s``, ``model_id``, ``error`` (the reason the track could not be embedded, null
when fine). The embed stage (``embedder``) writes it; probes, tags, suggestions and the index read it,
keep the ``usable`` rows and take their vectors as one ``matrix``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from musiclib.core import storage, versions


def schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("track_id", pa.string(), nullable=False),
            pa.field("embedding", pa.list_(pa.float32(), dim)),
            pa.field("n_chunks", pa.int32()),
            pa.field("duration_s", pa.float64()),
            pa.field("model_id", pa.string()),
            pa.field("error", pa.string()),
        ]
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


def usable_mask(table: pa.Table) -> pa.ChunkedArray:
    """Whether each row has an embedding and no error."""
    return pc.and_(pc.is_null(table["error"]), pc.is_valid(table["embedding"]))


def usable(table: pa.Table) -> pa.Table:
    """The rows with an embedding and no error, in their order."""
    return table.filter(usable_mask(table))


def matrix(table: pa.Table) -> np.ndarray:
    """The embeddings of rows that all have one (``usable``) as a float32 matrix ``[n, dim]``."""
    column = table["embedding"].combine_chunks()
    flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    if pa.types.is_fixed_size_list(column.type):
        return flat.reshape(len(table), column.type.list_size)
    return flat.reshape(len(table), -1 if len(table) else 0)
