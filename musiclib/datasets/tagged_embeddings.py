"""A catalog and embeddings whose vectors follow the tags: the tune and tag jobs' inputs without audio.

``make`` draws Zipf-like tag frequencies (a head and a long tail) and embeds each track as the sum of its
tags' prototypes plus noise (and, with ``logmel_dim``, gives it log-mel statistics made the same way from
other prototypes); ``write_root`` lays them out under a project root as the embed job would.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from musiclib import catalog
from musiclib.core import versions
from musiclib.core.config import Layout
from musiclib.embed import table as embeddings_table


def make(
    n_tracks: int = 300,
    n_tags: int = 12,
    dim: int = 32,
    labeled_fraction: float = 0.6,
    noise: float = 0.5,
    n_errors: int = 0,
    seed: int = 0,
    model_id: str = "synthetic",
    logmel_dim: int = 0,
) -> tuple[pa.Table, pa.Table]:
    """A catalog and an embeddings table whose embeddings are correlated with the tags (tests, benchmarks).

    Tag frequencies fall off like Zipf (a head and a long tail); each track's embedding is the sum of its
    tags' prototypes plus Gaussian noise. Unlabeled tracks get an empty ``tags`` list; the last
    ``n_errors`` tracks get an embedding error instead of a vector. ``logmel_dim`` > 0 adds the ``logmel``
    column, drawn as the embedding is from its own prototypes (and an offset, as log-mel values have);
    0 gives a table as written before the embed job computed the statistics.
    """
    rng = np.random.default_rng(seed)
    names = [f"tag{j:02d}" for j in range(n_tags)]
    freq = 0.5 / np.arange(1, n_tags + 1) ** 0.7
    truth = rng.random((n_tracks, n_tags)) < freq
    truth[~truth.any(axis=1), 0] = True
    prototypes = rng.normal(size=(n_tags, dim)).astype(np.float32)
    vectors = truth.astype(np.float32) @ prototypes + noise * rng.normal(size=(n_tracks, dim)).astype(
        np.float32
    )
    ids = [f"t{i:05d}" for i in range(n_tracks)]
    labeled = rng.random(n_tracks) < labeled_fraction
    splits = rng.choice(["train", "valid", "test"], size=n_tracks, p=[0.6, 0.2, 0.2])
    tags = [
        [names[j] for j in np.flatnonzero(row)] if lab else []
        for row, lab in zip(truth, labeled, strict=True)
    ]
    cat = pa.table(
        {
            "track_id": ids,
            "audio_uri": [f"audio/{t}.wav" for t in ids],
            "duration_s": np.full(n_tracks, 30.0),
            "tags": tags,
            "split": splits.tolist(),
        },
        schema=catalog.SCHEMA,
    )
    errors = [None] * (n_tracks - n_errors) + ["decode: corrupt header"] * n_errors
    decoded = pa.table(
        {
            "track_id": ids,
            "n_chunks": np.full(n_tracks, 4, np.int32),
            "duration_s": np.full(n_tracks, 30.0),
            "error": pa.array(errors, pa.string()),
        }
    )
    stats = None
    if logmel_dim:
        floor = rng.normal(size=(n_tags, logmel_dim)).astype(np.float32)
        stats = truth.astype(np.float32) @ floor + noise * rng.normal(size=(n_tracks, logmel_dim)) - 5.0
    return cat, embeddings_table.from_decoded(decoded, model_id, vectors, stats)


def write_root(root: str, model_id: str = "synthetic", **kwargs: Any) -> tuple[pa.Table, pa.Table]:
    """A project root holding a ``synthetic`` catalog, its embeddings of ``model_id`` and the latest-model
    pointer: what the tune and tag jobs read, without audio or an encoder (tests, benchmarks)."""
    cat, emb = make(model_id=model_id, **kwargs)
    layout = Layout(root)
    catalog.write(cat, layout.catalog)
    embeddings_table.publish_table(layout.embeddings, model_id, "v1", emb)
    versions.publish(layout.models, model_id, [], [])  # a model without an encoder
    return cat, emb
