"""The embeddings table: schema of the shards the embed job writes, and how later jobs read them.

``<root>/embeddings/<model_id>/`` is a versioned dataset (see ``storage``); the latest committed manifest
lists every Parquet file of the current, complete embedding set. One row per catalog track:
``track_id``, ``embedding`` (fixed-size list of float32; null when ``error`` is set), ``n_chunks``,
``duration_s``, ``model_id``, ``error`` (the decode failure reason, null when fine).
"""

from __future__ import annotations

import pyarrow as pa

from musiclib import storage


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
    return storage.join(embeddings_root, model_id)


def files(embeddings_root: str, model_id: str) -> list[str]:
    """URIs of the Parquet files of the latest committed embedding set of a model."""
    return storage.read_latest_manifest(dataset_uri(embeddings_root, model_id)).file_uris()


def read(embeddings_root: str, model_id: str, columns: list[str] | None = None) -> pa.Table:
    """The latest committed embeddings of a model as one table (probes fit on these; jobs stream instead)."""
    uris = files(embeddings_root, model_id)
    if not uris:
        raise storage.StorageError(f"embeddings of {model_id} under {embeddings_root} hold no files")
    return storage.read_parquet(uris, columns)


def publish_table(embeddings_root: str, model_id: str, version: str, table: pa.Table) -> storage.Manifest:
    """Publish ``table`` as one version of a model's embeddings, in one shard (synthetic data, small imports).

    The embed job writes many shards itself and publishes them the same way (``storage.publish``).
    """
    dataset = dataset_uri(embeddings_root, model_id)
    uri = storage.join(storage.version_uri(dataset, version), "part-00000.parquet")
    return storage.publish(dataset, version, [uri], [storage.write_parquet(table, uri)])
