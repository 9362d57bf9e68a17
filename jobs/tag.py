"""tag: apply the chosen probe set to every track's embedding and commit a snapshot of the tag table.

    python -m jobs.tag --root data/demo [--probe-run-id tune-...] [--only-new true] [--catalog-uri URI]

Ray Data reads each embedding file (the columns of the probe set's representation: the ``logmel`` column
only when its probes read the log-mel statistics), scores it with the probe set (one matrix product for
all tags, with its normalisation) and writes its long-form rows as one Parquet file into the Iceberg
table's data folder, one row group per tag, all in one task (``tags.write_model_rows``, ``--concurrency``
tasks at once), which returns the file's counts; beside them one task writes the catalog's human labels,
carried over unchanged, and a row with the reason for each track whose embedding carries an error or is
missing (``tags.write_catalog_rows``). Then one snapshot commits the run (``tag_table.commit``): readers
see it whole or not at all. The driver holds file lists and counts, never rows: the summary is the tasks'
counts and a one-tag read per long-tail tag (``tags.top``).
The run id is derived from the inputs (or ``--run-id``) and stored in the snapshot: a re-run with the
same inputs finds it and writes nothing. ``--only-new true`` scores only tracks without model rows of
the same probe run (and model) in the current snapshot and keeps those rows' files (and their counts,
from the snapshot's summary) as they are; rows of any other probe run are never kept, so one snapshot
holds the scores of one probe set.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import pyarrow as pa
import ray
from pyiceberg.table import Table

from musiclib import catalog
from musiclib.core import lifecycle, progress, ray_env, storage, versions
from musiclib.core.config import Layout, parse
from musiclib.core.ray_env import TASK_RETRIES, ray_session, retry_transient_storage
from musiclib.embed import table as embeddings_table
from musiclib.tag import tag_table, tags
from musiclib.tag.tags import Inputs, TagConfig


def score_with_ray(cfg: TagConfig, inputs: Inputs, rows_dir: str, tagged_at: str, skip: str) -> list[dict]:
    """Read, score and write each embedding file in one Ray task, ``--concurrency`` at a time; returns what
    each task wrote (``tags.WRITTEN``: its file and counts), skipping the tracks the file ``skip`` lists.

    The model rows go from the task straight to Parquet, never through the object store, and the tasks
    at once are set by the config, not by the catalog: the job's memory does not grow with the catalog.
    """
    columns = embeddings_table.columns(inputs.probe_set.representation)  # logmel only when the probes read it
    with progress.counting("tag", len(inputs.embedding_files), "files", "files") as counter:
        ds = ray_env.read_parquet(inputs.embedding_files, columns, cfg.concurrency)
        written = ds.map_batches(
            counted_model_rows,
            fn_args=(counter, inputs.probe_set, inputs.probe_run_id, tagged_at, rows_dir),
            fn_kwargs={"skip": skip, "batch_size": cfg.batch_size},
            batch_size=None,  # a whole file's block: one task reads, scores and writes it
            batch_format="pyarrow",
            compute=ray.data.TaskPoolStrategy(size=cfg.concurrency),
        )
        return written.take_all()


def counted_model_rows(block: pa.Table, counter: Any, *args: Any, **kwargs: Any) -> pa.Table:
    """``tags.write_model_rows`` in a Ray task, its file and tracks counted on the stage's ``counter``."""
    written = tags.write_model_rows(block, *args, **kwargs)
    counter.add.remote({"files": 1, "tracks": block.num_rows})
    return written


def remote(fn: Callable[..., Any]) -> Any:
    """``fn`` as a Ray task, run again when its worker dies or storage fails it (it rewrites its files)."""
    return ray.remote(fn).options(
        max_retries=TASK_RETRIES, retry_exceptions=[storage.TransientError, OSError]
    )


def write_run(
    cfg: TagConfig, layout: Layout, table: Table, inputs: Inputs, run_id: str
) -> tuple[tag_table.Run, tags.ModelCounts, tags.CatalogRows]:
    """Write every data file of the run (model, human and error rows), then commit them as one snapshot;
    returns it with the counts its summary prints. Whatever grows with the catalog is read and written in
    Ray tasks: the driver holds file lists and counts."""
    run_dir = tag_table.run_dir(table, run_id)
    storage.delete(run_dir, recursive=True)  # leftovers of a killed attempt were never committed
    tagged_at = versions.utc_now().isoformat(timespec="seconds")
    catalog_rows = remote(tags.write_catalog_rows).remote(
        layout.catalog, inputs.embedding_files, tagged_at, run_dir
    )
    keep, carried = (
        tags.carried_files(table, inputs.probe_set.model_id, inputs.probe_run_id)
        if cfg.only_new
        else (frozenset(), tags.ModelCounts())
    )
    skip = storage.join(run_dir, "scored-tracks.parquet") if keep else ""
    if keep:
        ray.get(remote(tags.write_scored_tracks).remote(sorted(keep), inputs.probe_set.tags[0], skip))
    written = score_with_ray(cfg, inputs, storage.join(run_dir, "model"), tagged_at, skip)
    if skip:
        storage.delete(skip)  # not a data file of the table
    counts = carried + tags.ModelCounts.of_written(written, inputs.probe_set.tags)
    cat: tags.CatalogRows = ray.get(catalog_rows)
    provenance = {
        "model-id": inputs.probe_set.model_id,
        "probe-run-id": inputs.probe_run_id,
        "representation": inputs.probe_set.representation,
        "embedding-version": inputs.embedding_version,
        "tagged-at": tagged_at,
        "carried-over-tracks": carried.tracks,
        tags.COUNTS: counts.to_json(),
        "code-version": versions.code_version(),
        "config": tag_table.config_properties(asdict(cfg)),
    }
    versions.check_lease(layout.tags)  # a run that lost its lease while paused must not commit
    files = [w["file"] for w in written] + cat.files
    return tag_table.commit(table, run_id, files, provenance, keep), counts, cat


def tagged(
    job: lifecycle.Job,
    cfg: TagConfig,
    table: Table,
    written: tuple[tag_table.Run, tags.ModelCounts, tags.CatalogRows],
    inputs: Inputs,
) -> lifecycle.Summary[tag_table.Run]:
    """The end of a run that wrote its snapshot: the counts its tasks returned, and the long tail's new
    tags (``tags.top``, one tag's rows at a time), then the summary."""
    run, counts, cat = written
    tail = [t for t in cat.tail if t in inputs.probe_set.tags][: cfg.summary_tags]
    new = {t: tags.top(table, t, snapshot_id=run.snapshot_id, new=True) for t in tail}
    print(tags.summarize(counts, cat, new))
    return job.done(
        run,
        read=f"embeddings {inputs.embedding_version} of {inputs.probe_set.model_id}, probe run {inputs.probe_run_id}",
        wrote=f"{counts.tracks} tracks tagged, {run.rows - sum(cat.errors.values())} rows in snapshot "
        f"{run.snapshot_id} (run {run.run_id})",
        skipped=Counter({r.removeprefix(tags.EMBEDDING_ERROR): n for r, n in cat.errors.items()}),
        outputs={"tags": cfg.where.describe()},
    )


def run(cfg: TagConfig) -> lifecycle.Summary[tag_table.Run]:
    """Score every embedding with the probe set and commit the run as one snapshot; the summary's result is
    the run. A re-run with the same inputs finds its snapshot and writes nothing."""
    job = lifecycle.Job("tag", cfg.root)
    layout = Layout(cfg.root, cfg.catalog)
    catalog.validate(layout.catalog)
    with versions.lease(layout.tags):  # one tag run at a time: runs would delete each other's files
        table = tag_table.open_table(cfg.where)
        previous = tag_table.current_run(table) if table else None
        inputs = tags.find_inputs(layout, cfg.probe_run_id)
        run_id = tags.derive_run_id(cfg, layout, inputs, previous)
        if table is not None and (done := tag_table.already_complete(table, run_id, "tag")) is not None:
            return job.done(
                done,
                read=f"the same inputs as run {done.run_id}",
                wrote=f"nothing: run {done.run_id} (snapshot {done.snapshot_id}, {done.rows} rows) was already complete",
                outputs={"tags": cfg.where.describe()},
            )
        table = tag_table.open_table(cfg.where, create_with=tags.SCHEMA)  # an older table gets the sort order
        with ray_session(cfg.ray_address, cfg.num_cpus), retry_transient_storage(TASK_RETRIES):
            written = write_run(cfg, layout, table, inputs, run_id)
    return tagged(job, cfg, table, written, inputs)


def main(argv: list[str] | None = None) -> tag_table.Run:
    return run(parse(TagConfig, argv)).result


if __name__ == "__main__":
    main()
