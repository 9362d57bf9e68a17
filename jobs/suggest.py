"""suggest: per tag, rank the unlabeled tracks whose labels would help its probe most; write a version.

    python -m jobs.suggest --root data/demo [--tags bell,drone] [--per-tag 20] [--probe-run-id tune-...]

1. Resolve, before Ray: the probe set the tag job applies (``--probe-run-id``, else the latest tune run),
   the tags asked for (an unknown tag, or one without a probe, is a one-line error and nothing is
   written), the catalog's labeled tracks (never suggested) and the model's latest embeddings.
2. Ray Data streams the embedding shards through the probe set, in its representation (the ``logmel``
   column read only when its probes read the statistics): one matrix product per block gives every
   tag's margin from its threshold, and each block keeps only its most uncertain tracks per tag
   (``suggest.block_candidates``). The driver merges them into each tag's pool as they arrive.
3. On the driver, each tag's batch is picked from its pool without near-duplicates (``suggest.select``)
   and written as ``<root>/suggestions/<version>/rows/suggestions.parquet``; ``_latest`` moves last.
The version id is derived from the inputs (or ``--run-id``): a re-run with the same inputs writes nothing.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from musiclib import catalog
from musiclib.core import lifecycle, progress, ray_env, storage, versions
from musiclib.core.config import Layout, parse
from musiclib.core.ray_env import TASK_RETRIES, ray_session, retry_transient_storage
from musiclib.embed import table as embeddings_table
from musiclib.probe.probes import ProbeSet
from musiclib.tag import suggest, tags
from musiclib.tag.suggest import SuggestConfig


class CandidateBlock:
    """Ray Data actor: loads the probe set once, then turns embedding blocks into per-tag candidates."""

    def __init__(self, probe_uri: str, tags: list[str], pool: int, labeled: frozenset[str]):
        self.probe_set = ProbeSet.load(probe_uri)
        self.columns = np.array([self.probe_set.tags.index(t) for t in tags], dtype=np.int64)
        self.pool = pool
        self.labeled = pa.array(sorted(labeled), pa.string())

    def __call__(self, batch: pa.Table) -> pa.Table:
        ok = pc.and_(
            embeddings_table.usable_mask(batch), pc.invert(pc.is_in(batch["track_id"], self.labeled))
        )
        rows = batch.filter(ok)
        x = embeddings_table.matrix(rows, self.probe_set.representation)
        ids = np.asarray(rows["track_id"].to_pylist(), dtype=str)
        return suggest.block_candidates(ids, x, self.probe_set, self.columns, self.pool)


def candidates_with_ray(
    cfg: SuggestConfig, inputs: tags.Inputs, wanted: list[str], labeled: frozenset[str]
) -> pa.Table:
    """Every wanted tag's pool of most uncertain unlabeled tracks, merged on the driver block by block."""
    ds = ray_env.read_parquet(
        inputs.embedding_files, embeddings_table.columns(inputs.probe_set.representation)
    )
    blocks = ds.map_batches(
        CandidateBlock,
        fn_constructor_args=(inputs.probe_uri, wanted, cfg.pool, labeled),
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
    )
    pool = suggest.candidates_schema(inputs.probe_set.weights.shape[0]).empty_table()
    throttle, started, blocks_done = progress.Throttle(), time.monotonic(), 0
    for block in blocks.iter_batches(batch_size=None, batch_format="pyarrow"):
        pool = suggest.merge_candidates(pool, block, cfg.pool)
        blocks_done += 1
        if throttle.due():
            rate = blocks_done / max(time.monotonic() - started, 1e-9)
            print(progress.progress_line("suggest", blocks_done, None, "blocks", rate), flush=True)
    return pool


def write_version(
    cfg: SuggestConfig, dataset: str, inputs: tags.Inputs, wanted: list[str], version: str, pool: pa.Table
) -> versions.Manifest:
    """Pick each tag's batch from its pool, write the table and publish it as ``version``."""
    thresholds = dict(zip(inputs.probe_set.tags, inputs.probe_set.thresholds.tolist()))
    table = suggest.select(pool, wanted, thresholds, cfg.per_tag, cfg.max_similarity)
    uri = storage.join(versions.version_uri(dataset, version), suggest.ROWS_FILE)
    rows = storage.write_parquet(table, uri)
    provenance = {
        "model_id": inputs.probe_set.model_id,
        "probe_run_id": inputs.probe_run_id,
        "embedding_version": inputs.embedding_version,
        "suggested_at": versions.utc_now().isoformat(timespec="seconds"),
    }
    return versions.publish(dataset, version, [uri], [rows], config=asdict(cfg), extra=provenance)


def run(cfg: SuggestConfig) -> lifecycle.Summary[versions.Manifest]:
    """Rank each wanted tag's most uncertain unlabeled tracks and publish them as a version (a re-run with the
    same inputs finds it and writes nothing); the summary's result is the version's manifest."""
    job = lifecycle.Job("suggest", cfg.root)
    layout = Layout(cfg.root, cfg.catalog)
    catalog.validate(layout.catalog)
    dataset = layout.suggestions
    with versions.lease(dataset):  # one suggest run at a time writes the suggestions
        inputs = tags.find_inputs(layout, cfg.probe_run_id)
        wanted, labeled = suggest.targets(cfg, layout, inputs)
        version = suggest.derive_run_id(cfg, layout, inputs, wanted)
        if (done := job.already_complete(dataset, version)) is not None:
            return done
        with ray_session(cfg.ray_address, cfg.num_cpus), retry_transient_storage(TASK_RETRIES):
            pool = candidates_with_ray(cfg, inputs, wanted, labeled)
        manifest = write_version(cfg, dataset, inputs, wanted, version, pool)
    errors = storage.read_parquet(inputs.embedding_files, ["error"])["error"]
    table = suggest.read_version(manifest)
    return job.done(
        manifest,
        read=f"embeddings {inputs.embedding_version} of {inputs.probe_set.model_id}, "
        f"probe run {inputs.probe_run_id}",
        wrote=f"{len(table)} suggestions for {len(wanted)} tags ({cfg.per_tag} asked per tag) "
        f"in version {manifest.version}",
        skipped=+Counter({"labeled": len(labeled), "embedding error": len(errors) - errors.null_count}),
        outputs={"suggestions": versions.version_uri(dataset, manifest.version)},
    )


def main(argv: list[str] | None = None) -> versions.Manifest:
    return run(parse(SuggestConfig, argv)).result


if __name__ == "__main__":
    main()
