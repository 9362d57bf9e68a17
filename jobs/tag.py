"""tag: apply the chosen probe set to every track's embedding and write a versioned tag table.

    python jobs/tag.py --root data/demo [--probe-run-id tune-...] [--only-new true]

Ray Data streams the embedding shards through the probe set (one matrix product for all tags, with its
normalisation) and writes long-form Parquet under ``<root>/tags/<version>/rows/``; the catalog's human
labels are carried over unchanged; tracks whose embedding carries an error are listed with the reason.
The version is published with ``versions.publish``, so ``_latest`` moves only once it is complete.
The version id is derived from the inputs (or ``--run-id``): a re-run with the same inputs writes nothing
and only points ``_latest`` at that version (repairing a crash between the manifest and the pointer).
``--only-new true`` scores only tracks without model rows of the same probe run (and model) in the latest
version and carries those rows over; rows of any other probe run are never carried, so one version holds
the scores of one probe set.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.compute as pc
import ray

from musiclib import catalog, embedder, progress, ray_env, storage, tags, versions
from musiclib.config import ConfigError, Layout, parse
from musiclib.probes import ProbeSet
from musiclib.ray_env import ray_session, retry_transient_storage
from musiclib.tags import TagConfig

TASK_RETRIES = 6  # read and scoring tasks run again after S3 errors (backing off ~1 min in all)


@dataclass
class Inputs:
    """Everything a tag version depends on, resolved and checked before Ray starts."""

    probe_run_id: str
    probe_uri: str
    probe_set: ProbeSet
    embedding_files: list[str]
    embedding_version: str
    previous: versions.Manifest | None  # the latest tag version, if any


def resolve(cfg: TagConfig, layout: Layout) -> Inputs:
    """Find the probe set and its model's embeddings; a clear error when either is missing or empty."""
    run_id = cfg.probe_run_id or versions.latest_version(layout.probes)
    if run_id is None or versions.read_manifest(layout.probes, run_id) is None:
        raise ConfigError(
            f"no published probe run {cfg.probe_run_id or ''} under {layout.probes}: run tune first"
        )
    probe_uri = storage.join(versions.version_uri(layout.probes, run_id), "probe_set.safetensors")
    probe_set = ProbeSet.load(probe_uri)
    if probe_set.thresholds is None:
        raise ConfigError(f"probe set {probe_uri} has no thresholds")
    dataset = embedder.dataset_uri(layout.embeddings, probe_set.model_id)
    if versions.latest_version(dataset) is None:
        raise ConfigError(f"no embeddings of {probe_set.model_id} under {layout.embeddings}: run embed first")
    emb = versions.read_latest_manifest(dataset)  # files and version from the same manifest
    if emb.rows == 0:
        raise ConfigError(
            f"the embeddings of {probe_set.model_id} hold no rows: version {emb.version} of {dataset} "
            f"lists {len(emb.files)} file(s); run embed on a non-empty catalog"
        )
    previous = versions.read_latest_manifest(layout.tags) if versions.latest_version(layout.tags) else None
    return Inputs(run_id, probe_uri, probe_set, emb.file_uris(), emb.version, previous)


def version_id(cfg: TagConfig, layout: Layout, inputs: Inputs) -> str:
    """``--run-id``, else ``tags-<digest>`` of the probe set, embeddings, catalog and mode."""
    if cfg.run_id:
        return cfg.run_id
    parts = [
        storage.file_checksum(inputs.probe_uri),
        inputs.probe_set.model_id,
        inputs.embedding_version,
        storage.file_checksum(layout.catalog),
        cfg.only_new,
        inputs.previous.version if cfg.only_new and inputs.previous else None,
    ]
    return versions.digest_version("tags", parts)


class ScoreBatch:
    """Ray Data actor: loads the probe set once, then turns embedding batches into long-form tag rows."""

    def __init__(self, probe_uri: str, probe_run_id: str, tagged_at: str, skip: frozenset[str]):
        self.probe_set = ProbeSet.load(probe_uri)
        self.probe_run_id, self.tagged_at = probe_run_id, tagged_at
        self.skip = pa.array(sorted(skip), pa.string())

    def __call__(self, batch: pa.Table) -> pa.Table:
        ok = pc.and_(pc.is_null(batch["error"]), pc.is_valid(batch["embedding"]))
        if len(self.skip):
            ok = pc.and_(ok, pc.invert(pc.is_in(batch["track_id"], self.skip)))
        return tags.model_rows(batch.filter(ok), self.probe_set, self.probe_run_id, self.tagged_at)


def score_with_ray(
    cfg: TagConfig, inputs: Inputs, rows_dir: str, tagged_at: str, skip: frozenset[str]
) -> None:
    """Stream the embedding shards through the probe set and write the model rows as Parquet."""
    ds = ray_env.read_parquet(inputs.embedding_files, ["track_id", "embedding", "error"])
    scored = ds.map_batches(
        ScoreBatch,
        fn_constructor_args=(inputs.probe_uri, inputs.probe_run_id, tagged_at, skip),
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
    )
    out_fs, out_path = storage.arrow_filesystem(rows_dir)
    scored.write_parquet(out_path, filesystem=out_fs)


def write_version(cfg: TagConfig, layout: Layout, inputs: Inputs, version: str) -> versions.Manifest:
    """Write every file of the version (model, carried-over, human rows and errors), then publish it."""
    version_dir = versions.version_uri(layout.tags, version)
    storage.delete(version_dir, recursive=True)  # leftovers of a crashed attempt are never committed
    rows_dir = storage.join(version_dir, tags.ROWS_DIR)
    tagged_at = versions.utc_now().isoformat(timespec="seconds")
    cat = catalog.read(layout.catalog, columns=["track_id", "tags"])
    carried = (
        tags.already_tagged(inputs.previous, inputs.probe_set.model_id, inputs.probe_run_id)
        if cfg.only_new
        else tags.SCHEMA.empty_table()
    )
    skip = frozenset(carried["track_id"].to_pylist())
    score_with_ray(cfg, inputs, storage.join(rows_dir, "model"), tagged_at, skip)
    files = storage.list_files(storage.join(rows_dir, "model"), ".parquet")
    counts = [storage.parquet_rows(u) for u in files]
    extra_files = {
        storage.join(rows_dir, "human.parquet"): tags.human_rows(cat, tagged_at),
        storage.join(rows_dir, "carried.parquet"): carried,
        storage.join(version_dir, tags.ERRORS_FILE): tags.embedding_errors(
            inputs.embedding_files, cat["track_id"].to_pylist()
        ),
    }
    for uri, table in extra_files.items():
        files.append(uri)
        counts.append(storage.write_parquet(table, uri))
    provenance = {
        "model_id": inputs.probe_set.model_id,
        "probe_run_id": inputs.probe_run_id,
        "embedding_version": inputs.embedding_version,
        "tagged_at": tagged_at,
        "carried_over_tracks": len(skip),
    }
    return versions.publish(layout.tags, version, files, counts, config=asdict(cfg), extra=provenance)


def print_summary(
    layout: Layout, manifest: versions.Manifest, inputs: Inputs, cfg: TagConfig, started: float
) -> None:
    """The end-of-job summary: counts per tag, new long-tail tags, what was read, written and skipped."""
    table = tags.read_version(manifest, ["track_id", "tag", "score", "source", "predicted"])
    vocab = catalog.vocabulary(layout.catalog, split="train")
    tail = [t for t in reversed(vocab.tail) if t in inputs.probe_set.tags][: cfg.summary_tags]
    errors = tags.read_errors(manifest)
    print(tags.summarize(table, tail))
    progress.summary(
        "tag",
        cfg.root,
        started,
        read=f"embeddings {inputs.embedding_version} of {inputs.probe_set.model_id}, probe run {inputs.probe_run_id}",
        wrote=f"{len(pc.unique(table.filter(pc.field('source') == 'model')['track_id']))} tracks tagged, "
        f"{len(table)} rows in version {manifest.version}",
        skipped=Counter(r.removeprefix("embedding error: ") for r in errors["reason"].to_pylist()),
        outputs={"tags": versions.version_uri(layout.tags, manifest.version)},
    )


def main(argv: list[str] | None = None) -> versions.Manifest:
    cfg = parse(TagConfig, argv)
    started = progress.start("tag")
    layout = Layout(cfg.root)
    catalog.validate(layout.catalog)
    with versions.lease(layout.tags):  # one tag run at a time: runs would delete each other's folders
        inputs = resolve(cfg, layout)
        version = version_id(cfg, layout, inputs)
        manifest = versions.already_complete(layout.tags, version, "tag")
        if manifest is not None:
            progress.already_done("tag", cfg.root, started, layout.tags, manifest)
            return manifest
        with ray_session(cfg.ray_address, cfg.num_cpus), retry_transient_storage(TASK_RETRIES):
            manifest = write_version(cfg, layout, inputs, version)
    print_summary(layout, manifest, inputs, cfg, started)
    return manifest


if __name__ == "__main__":
    main()
