"""index: build the nearest-neighbour index over a model's latest embeddings and store it beside them.

    python -m jobs.index --root data/demo [--model-id M] [--kind auto|exact|ivf] [--nprobe 32]

A driver job (no Ray): reads the latest embeddings of the model (``models.model_id_or_latest``) in the
space nearest tracks are measured in (``neighbors.find_space``: the representation and normalisation of
the latest probe run of the model, else the learned embedding), builds the index in this process
(``index.build``: exact below ``--exact-below`` tracks, else faiss IVF) and publishes
``<root>/index/<model_id>/<version>/`` (``index.safetensors``, ``ids.parquet``) as a versioned dataset.
The version id (``neighbors.derive_run_id``) is a digest of the embeddings version, the space and the
build settings: a re-run on the same embeddings and probe run finds it complete and writes nothing; new
embeddings or a new probe run give a new version. ``musiclib.tag.tags seed`` and ``similar`` use the
index when it matches the latest embeddings and probe run.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict

from musiclib.core import lifecycle, versions
from musiclib.core.config import ConfigError, Layout, parse
from musiclib.embed import table as embeddings_table
from musiclib.tag import neighbors
from musiclib.tag.index import build
from musiclib.tag.neighbors import IndexConfig
from musiclib.train import models


def run(cfg: IndexConfig) -> lifecycle.Summary[versions.Manifest]:
    """Build the index over the model's latest embeddings and publish it (a re-run on the same embeddings
    finds its version and writes nothing); the summary's result is the version's manifest."""
    job = lifecycle.Job("index", cfg.root)
    layout = Layout(cfg.root)
    model_id = models.model_id_or_latest(layout.models, cfg.model_id)
    embeddings = embeddings_table.dataset_uri(layout.embeddings, model_id)
    if versions.latest_version(embeddings) is None:
        raise ConfigError(f"no embeddings of {model_id} under {layout.embeddings}: run embed first")
    emb = versions.read_latest_manifest(embeddings)
    space = neighbors.find_space(layout, model_id)
    dataset = neighbors.index_uri(layout, model_id)
    version = neighbors.derive_run_id(cfg, emb.version, space)
    with versions.lease(dataset):  # one index build at a time per model
        if (done := job.already_complete(dataset, version)) is not None:
            return done
        ids, vectors, errors = neighbors.usable_embeddings(emb.file_uris(), space)
        if len(ids) == 0:
            raise ConfigError(f"no track has an embedding in version {emb.version} of {embeddings}")
        if cfg.threads:
            import faiss

            faiss.omp_set_num_threads(cfg.threads)
        index = build(vectors, cfg.kind, cfg.exact_below, cfg.nlist, cfg.nprobe, cfg.train_size)
        extra = {
            "model_id": model_id,
            "embedding_version": emb.version,
            "representation": space.representation,
            "probe_run_id": space.probe_run_id,
            "kind": index.kind,
            "dim": index.dim,
        }
        manifest = neighbors.write_version(dataset, version, index, ids, asdict(cfg), extra)
    return job.done(
        manifest,
        read=f"embeddings {emb.version} of {model_id}: {len(ids) + len(errors)} rows, in {space.describe()}",
        wrote=f"{index.kind} index of {len(ids)} tracks x {index.dim} dimensions, version {version}",
        skipped=Counter(errors.values()),
        outputs={"index": versions.version_uri(dataset, version)},
    )


def main(argv: list[str] | None = None) -> versions.Manifest:
    return run(parse(IndexConfig, argv)).result


if __name__ == "__main__":
    main()
