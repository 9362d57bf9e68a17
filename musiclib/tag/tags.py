"""The tag table: what the tag job writes beside the catalog, how to read it, and a small query tool.

The table is an Apache Iceberg table (``tag_table``: catalog, snapshots, commits), one snapshot per tag
run. It holds, in long form, one row per (track, tag): ``track_id``, ``tag``, ``score``, ``source``
(``human``: a catalog label, carried over unchanged with score 1; ``model``: a probe's score for every
tag; ``error``: a track that could not be tagged, no tag, the reason in ``reason``), ``predicted`` (the
score reached the tag's threshold; always true for human labels) and provenance ``model_id``,
``probe_run_id``, ``tagged_at``. All model rows of a snapshot come from one probe run (``--only-new``
keeps only rows of the same run).

    python -m musiclib.tag.tags show TRACK_ID [--root ROOT] [--run RUN_ID]
    python -m musiclib.tag.tags top TAG [--root ROOT] [--n 10] [--run RUN_ID]
    python -m musiclib.tag.tags sql "SELECT tag, count(*) FROM tags GROUP BY tag" [--root ROOT]
    python -m musiclib.tag.tags history [--root ROOT]      # the runs (snapshots) of the table
    python -m musiclib.tag.tags outputs [--root ROOT]      # what each job did, where the outputs are
    python -m musiclib.tag.tags similar TRACK_ID [--root ROOT] [--n 10] [--model-id M]
    python -m musiclib.tag.tags seed TAG [--examples ID,ID] [--confirm ID,ID] [--split train] [--root ROOT] [--n 10]

The table commands take ``--catalog-uri`` and ``--table`` (``tag_table``) and read the current snapshot,
or the snapshot of ``--run`` (time travel). ``similar`` and ``seed`` are nearest-neighbour queries over
the embeddings (``neighbors.command``); ``seed TAG --confirm ID,ID`` writes TAG as a human label of the
confirmed tracks (and the examples) into the catalog, where the next tune and tag runs read it. ``outputs``
is ``musiclib.core.outputs``, told where the tag table's current snapshot is.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.expressions import EqualTo
from pyiceberg.table import Table

from musiclib import catalog
from musiclib.core import storage, versions
from musiclib.core.config import DEFAULT_ROOT, ConfigError, Layout, RayConfig, check, take_flags
from musiclib.core.iceberg import DEFAULT_CATALOG, catalog_problem, shared_catalog_problem
from musiclib.core.outputs import print_outputs, print_table
from musiclib.embed import table as embeddings_table
from musiclib.tag import tag_table
from musiclib.tag.tag_table import DEFAULT_TABLE, Where

if TYPE_CHECKING:  # the query tool starts without torch
    from musiclib.probe.probes import ProbeSet

SCHEMA = pa.schema(
    [
        pa.field("track_id", pa.string(), nullable=False),
        pa.field("tag", pa.string()),
        pa.field("score", pa.float32()),
        pa.field("source", pa.string(), nullable=False),
        pa.field("predicted", pa.bool_()),
        pa.field("model_id", pa.string()),
        pa.field("probe_run_id", pa.string()),
        pa.field("tagged_at", pa.string()),
        pa.field("reason", pa.string()),
    ]
)


EMBEDDING_ERROR = "embedding error: "  # an error row's reason: this, then the embed job's reason


@dataclass
class TagConfig(RayConfig):
    """Write predicted tags, with scores and provenance, beside the catalog."""

    root: str = DEFAULT_ROOT
    catalog: str = ""  # the track catalog (musiclib.catalog); empty: <root>/catalog/tracks.parquet
    catalog_uri: str = (
        DEFAULT_CATALOG  # the Iceberg catalog (empty: a local root's SQLite file, see core.iceberg)
    )
    table: str = DEFAULT_TABLE  # the Iceberg table, <namespace>.<name>
    probe_run_id: str = ""  # empty: the latest published tune run
    run_id: str = ""  # empty: derived from the inputs, so the same inputs give the same snapshot
    only_new: bool = False  # tag only tracks without rows of this probe run in the current snapshot
    batch_size: int = 4096  # tracks scored at a time in a task (one row group of its model-row file)
    concurrency: int = 1  # embedding files read, scored and written at once (one task each)
    summary_tags: int = 3  # long-tail tags whose most confident new tags the summary lists

    def validate(self) -> None:
        problems = RayConfig.problems(self)
        if self.batch_size < 1 or self.concurrency < 1 or self.summary_tags < 0:
            problems.append("--batch-size and --concurrency must be at least 1, --summary-tags at least 0")
        namespace, _, name = self.table.rpartition(".")
        if not namespace or not name:
            problems.append(f"--table must be <namespace>.<name>, got {self.table!r}")
        if problem := catalog_problem(self.catalog_uri):
            problems.append(problem)
        if problem := shared_catalog_problem(self.catalog_uri, self.root):
            problems.append(problem)
        check("tag", problems)

    @property
    def where(self) -> Where:
        return Where(self.root, self.catalog_uri, self.table)


def carried_files(table: Table, model_id: str, probe_run_id: str) -> tuple[frozenset[str], frozenset[str]]:
    """What ``--only-new`` keeps of the current snapshot: its model files and their tracks, when its model
    rows come from this probe run and model; nothing otherwise.

    Rows of another probe run (an older sweep of the same model included) are not kept, so their tracks
    are scored again with the current probe set and a snapshot never mixes probe sets.
    """
    current = tag_table.current_run(table)
    if current is None or (current.properties.get("model-id"), current.properties.get("probe-run-id")) != (
        model_id,
        probe_run_id,
    ):
        return frozenset(), frozenset()
    keep = frozenset(f.file_path for f in tag_table.data_files(table) if "/model/" in f.file_path)
    rows = tag_table.read(table, EqualTo("source", "model"), ("track_id",))
    return keep, frozenset(rows["track_id"].to_pylist())


def embedding_errors(files: list[str], catalog_ids: list[str], tagged_at: str) -> pa.Table:
    """Rows for tracks with an embedding error (its reason) and catalog tracks with no embedding row."""
    emb = storage.read_parquet(files, ["track_id", "error"])
    failed = emb.filter(pc.is_valid(emb["error"]))
    seen = set(emb["track_id"].to_pylist())
    missing = [t for t in catalog_ids if t not in seen]
    ids = failed["track_id"].to_pylist() + missing
    n = len(ids)
    return pa.table(
        {
            "track_id": ids,
            "tag": [None] * n,
            "score": pa.nulls(n, pa.float32()),
            "source": ["error"] * n,
            "predicted": pa.nulls(n, pa.bool_()),
            "model_id": [None] * n,
            "probe_run_id": [None] * n,
            "tagged_at": [tagged_at] * n,
            "reason": [EMBEDDING_ERROR + e for e in failed["error"].to_pylist()]
            + ["no embedding"] * len(missing),
        },
        schema=SCHEMA,
    )


WRITTEN = pa.schema([pa.field("file", pa.string()), pa.field("tracks", pa.int64())])


def write_model_rows(
    embeddings: pa.Table,
    probe_set: ProbeSet,
    probe_run_id: str,
    tagged_at: str,
    folder: str,
    skip: pa.Array | None = None,
    batch_size: int = 4096,
) -> pa.Table:
    """Score a block of embedding rows and write their model rows as one Parquet file in ``folder``.

    The block holds the columns of the probe set's representation (``embeddings_table.columns``). Rows
    with an error or no vector, and tracks in ``skip``, get none. ``batch_size`` tracks are scored
    at a time, each batch one row group, so memory follows the batch, not the block. The file is named
    by a digest of its track ids: a retried task rewrites its own file. Returns the file and its track
    count (``WRITTEN``; no row when nothing was scored).
    """
    scored = embeddings_table.usable(embeddings)
    if skip is not None and len(skip):
        scored = scored.filter(pc.invert(pc.is_in(scored["track_id"], skip)))
    if len(scored) == 0:
        return WRITTEN.empty_table()
    name = hashlib.sha256("\n".join(scored["track_id"].to_pylist()).encode()).hexdigest()[:32]
    uri = storage.join(folder, f"model-{name}.parquet")
    batches = range(0, len(scored), batch_size)
    parts = (model_rows(scored.slice(i, batch_size), probe_set, probe_run_id, tagged_at) for i in batches)
    storage.write_parquet_parts(parts, SCHEMA, uri)
    pa.default_memory_pool().release_unused()  # an idle worker then holds no more after a large block
    return pa.table({"file": [uri], "tracks": [len(scored)]}, schema=WRITTEN)


def model_rows(table: pa.Table, probe_set: ProbeSet, probe_run_id: str, tagged_at: str) -> pa.Table:
    """Score a batch of embedding rows (no errors) with every tag: one matrix product on the probe set's
    representation (``embeddings_table.matrix``), then long form."""
    n, n_tags = len(table), len(probe_set.tags)
    if n == 0:
        return SCHEMA.empty_table()
    scores = probe_set.apply(embeddings_table.matrix(table, probe_set.representation))
    rows = n * n_tags  # track-major: track i's tags are rows i * n_tags ... (i + 1) * n_tags - 1
    return pa.table(
        {
            "track_id": table.column("track_id").take(np.repeat(np.arange(n), n_tags)),
            "tag": pa.array(probe_set.tags, pa.string()).take(np.tile(np.arange(n_tags), n)),
            "score": scores.astype(np.float32).ravel(),
            "source": pa.repeat(pa.scalar("model"), rows),
            "predicted": probe_set.predict(scores).ravel(),
            "model_id": pa.repeat(pa.scalar(probe_set.model_id, pa.string()), rows),
            "probe_run_id": pa.repeat(pa.scalar(probe_run_id, pa.string()), rows),
            "tagged_at": pa.repeat(pa.scalar(tagged_at, pa.string()), rows),
            "reason": pa.nulls(rows, pa.string()),
        },
        schema=SCHEMA,
    )


def human_rows(catalog_table: pa.Table, tagged_at: str) -> pa.Table:
    """The catalog's human labels, one row per (track, tag), carried over exactly as labeled."""
    ids, names = [], []
    for tid, labels in zip(
        catalog_table["track_id"].to_pylist(), catalog_table["tags"].to_pylist(), strict=True
    ):
        for tag in labels or ():
            ids.append(tid)
            names.append(tag)
    n = len(ids)
    return pa.table(
        {
            "track_id": ids,
            "tag": names,
            "score": np.ones(n, np.float32),
            "source": ["human"] * n,
            "predicted": np.ones(n, bool),
            "model_id": [None] * n,
            "probe_run_id": [None] * n,
            "tagged_at": [tagged_at] * n,
            "reason": [None] * n,
        },
        schema=SCHEMA,
    )


def read_errors(table: Table, snapshot_id: int | None = None) -> pa.Table:
    """Tracks a snapshot (default: the current one) could not tag, with the reason."""
    return tag_table.read(table, EqualTo("source", "error"), ("track_id", "reason"), snapshot_id)


def show(table: Table, track_id: str, snapshot_id: int | None = None) -> pa.Table:
    """Every tag row of one track: human labels first, then model scores, highest first."""
    rows = tag_table.read(table, EqualTo("track_id", track_id), snapshot_id=snapshot_id)
    return rows.sort_by([("source", "ascending"), ("score", "descending")])


def top(table: Table, tag: str, n: int = 10, snapshot_id: int | None = None) -> pa.Table:
    """The ``n`` tracks the model scores highest for ``tag``, with whether a human labeled them so."""
    rows = tag_table.read(table, EqualTo("tag", tag), snapshot_id=snapshot_id)
    model = rows.filter(pc.field("source") == "model")
    human = set(rows.filter(pc.field("source") == "human")["track_id"].to_pylist())
    best = model.sort_by([("score", "descending"), ("track_id", "ascending")]).slice(0, n)
    return best.append_column("human_label", pa.array([t in human for t in best["track_id"].to_pylist()]))


def history(table: Table) -> pa.Table:
    """The table's runs, oldest first: snapshot, commit time, run id, probe run, rows."""
    runs = tag_table.runs(table)
    return pa.table(
        {
            "snapshot_id": [r.snapshot_id for r in runs],
            "committed_at": [r.committed_at for r in runs],
            "run_id": [r.run_id for r in runs],
            "probe_run_id": [r.properties.get("probe-run-id") for r in runs],
            "rows": [r.rows for r in runs],
        }
    )


def summarize(table: pa.Table, long_tail: Sequence[str], n_top: int = 10) -> str:
    """Counts a person can check: tracks tagged, tags per track, tracks per tag (predicted vs human), and
    the most confident new tags (predicted, no such human label) of a few long-tail tags."""
    frame = table.to_pandas()
    model = frame[frame["source"] == "model"]
    human = frame[frame["source"] == "human"]
    predicted = model[model["predicted"]]
    per_track = predicted.groupby("track_id").size().reindex(model["track_id"].unique(), fill_value=0)
    lines = [
        f"tracks tagged by the model: {model['track_id'].nunique()}",
        f"tracks with human labels: {human['track_id'].nunique()}",
        f"predicted tags per track: mean {per_track.mean():.2f}, none {int((per_track == 0).sum())}",
        "tracks per tag (predicted / human):",
    ]
    counts = pd.DataFrame(
        {"predicted": predicted.groupby("tag").size(), "human": human.groupby("tag").size()}
    )
    for tag, row in counts.fillna(0).astype(int).sort_values("predicted", ascending=False).iterrows():
        lines.append(f"  {tag:<24} {row['predicted']:>7} / {row['human']}")
    labeled = set(zip(human["track_id"], human["tag"], strict=True))
    for tag in long_tail:
        rows = predicted[predicted["tag"] == tag]
        new = rows[[(t, tag) not in labeled for t in rows["track_id"]]].nlargest(n_top, "score")
        listed = ", ".join(f"{t} ({s:.2f})" for t, s in zip(new["track_id"], new["score"], strict=True))
        lines.append(f"most confident new '{tag}' tags: {listed or 'none'}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Inputs:
    """What a run of the tag stage (the tag and suggest jobs) applies, found and checked before Ray starts:
    a probe run's probe set and the latest embeddings of its model, which hold its representation."""

    probe_run_id: str
    probe_uri: str
    probe_set: ProbeSet
    embedding_files: list[str]
    embedding_version: str


def find_inputs(layout: Layout, probe_run_id: str = "") -> Inputs:
    """``probe_run_id`` (else the latest probe run) and its model's latest embeddings; a one-line
    ``ConfigError`` when either is missing, has no thresholds, holds no rows, or the embeddings cannot give
    the probe set's representation (a ``fused`` probe set on embeddings without the ``logmel`` column)."""
    from musiclib.probe.probes import ProbeSet

    run_id = probe_run_id or versions.latest_version(layout.probes)
    if run_id is None or versions.read_manifest(layout.probes, run_id) is None:
        raise ConfigError(
            f"no published probe run {probe_run_id or ''} under {layout.probes}: run tune first"
        )
    probe_uri = storage.join(versions.version_uri(layout.probes, run_id), "probe_set.safetensors")
    probe_set = ProbeSet.load(probe_uri)
    if probe_set.thresholds is None:
        raise ConfigError(f"probe set {probe_uri} has no thresholds")
    dataset = embeddings_table.dataset_uri(layout.embeddings, probe_set.model_id)
    if versions.latest_version(dataset) is None:
        raise ConfigError(f"no embeddings of {probe_set.model_id} under {layout.embeddings}: run embed first")
    emb = versions.read_latest_manifest(dataset)  # files and version from the same manifest
    if emb.rows == 0:
        raise ConfigError(
            f"the embeddings of {probe_set.model_id} hold no rows: version {emb.version} of {dataset} "
            f"lists {len(emb.files)} file(s); run embed on a non-empty catalog"
        )
    what = f"the embeddings of {probe_set.model_id} (version {emb.version})"
    embeddings_table.require(probe_set.representation, embeddings_table.offered(emb.file_uris()), what)
    return Inputs(run_id, probe_uri, probe_set, emb.file_uris(), emb.version)


def derive_run_id(cfg: TagConfig, layout: Layout, inputs: Inputs, previous: tag_table.Run | None) -> str:
    """``--run-id``, else ``tags-<digest>`` of the probe set, embeddings, catalog version and mode (with
    ``--only-new``, the table's current run ``previous`` too)."""
    if cfg.run_id:
        return cfg.run_id
    parts = [
        storage.file_checksum(inputs.probe_uri),
        inputs.probe_set.model_id,
        inputs.embedding_version,
        catalog.version(layout.catalog),
        cfg.only_new,
        previous.run_id if cfg.only_new and previous else None,
    ]
    return versions.digest_version("tags", parts)


def current_snapshot(where: Where) -> str | None:
    """Where the tag table's current snapshot is, as the outputs listing shows it (None: no snapshot yet)."""
    table = tag_table.open_table(where)
    current = None if table is None else tag_table.current_run(table)
    if current is None:
        return None
    return f"{where.describe()}, snapshot {current.snapshot_id} (run {current.run_id})"


USAGE = (
    "usage: musiclib tags show TRACK_ID | top TAG | sql QUERY | history | outputs "
    "[--root ROOT] [--n N] [--run RUN_ID] [--catalog-uri URI] [--table NAMESPACE.NAME]"
    " | similar TRACK_ID | seed TAG [--examples ID,ID] [--confirm ID,ID] [--split train] [--model-id M]"
)
HELP = f"""usage: musiclib tags COMMAND [ARGUMENT] [options]   (or: python -m musiclib.tag.tags ...)

Query the tag table's current snapshot (or an earlier run's), and the embeddings.

commands:
  show TRACK_ID      every tag of a track
  top TAG            the tracks with the highest scores for a tag
  sql QUERY          a DuckDB query over the snapshot, as the table `tags`
  history            the runs of the table: snapshot, time, run id, rows
  outputs            what each job did, and where its outputs are
  similar TRACK_ID   the nearest tracks in the embeddings
  seed TAG           candidates for a new tag near --examples (default: the tag's labeled tracks);
                     --confirm writes the tag as a label of the examples and the confirmed tracks

options:
  --root str, default {DEFAULT_ROOT!r}
      where the datasets live: a local folder or s3://bucket/prefix
  --n int, default 10
      rows of top, similar and seed
  --run str, default ''
      the run (snapshot) to read; empty: the current one
  --catalog-uri str, default {DEFAULT_CATALOG!r}
      the Iceberg catalog (empty: the root's default)
  --table str, default {DEFAULT_TABLE!r}
      the Iceberg table, <namespace>.<name>
  --examples list[str], default ''
      seed: the tracks the new tag starts from, comma-separated
  --confirm list[str], default ''
      seed: the tracks that get the tag as a human label, comma-separated
  --split str, default 'train'
      seed --confirm: the split of confirmed tracks that have none
  --model-id str, default ''
      similar, seed: the model whose embeddings are searched (empty: the latest)"""


def main(argv: list[str] | None = None) -> None:
    """``show``, ``top``, ``sql``, ``history`` or ``outputs`` against the current snapshot under ``--root``;
    ``similar`` and ``seed`` over the embeddings (``neighbors.command``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--help" in args or "-h" in args:
        print(HELP)
        return
    flags = {
        "--root": DEFAULT_ROOT,
        "--n": "10",
        "--run": "",
        "--catalog-uri": DEFAULT_CATALOG,
        "--table": DEFAULT_TABLE,
    }
    take_flags(args, flags, USAGE)
    if args and args[0] in ("similar", "seed"):
        from musiclib.tag import neighbors  # loads the encoder's modules: only these two commands need them

        neighbors.command(args, storage.normalize_uri(flags["--root"]), int(flags["--n"]))
        return
    where = Where(storage.normalize_uri(flags["--root"]), flags["--catalog-uri"], flags["--table"])
    if problem := catalog_problem(where.catalog_uri) or shared_catalog_problem(where.catalog_uri, where.root):
        raise SystemExit(problem)
    if args == ["outputs"]:
        print_outputs(Layout(where.root), current_snapshot(where))
        return
    command = args[0] if args else ""
    if (command, len(args)) not in (("show", 2), ("top", 2), ("sql", 2), ("history", 1)):
        raise SystemExit(USAGE)
    table = tag_table.require_table(where)
    snapshot_id = None
    if flags["--run"]:
        run = tag_table.find_run(table, flags["--run"])
        if run is None:
            raise SystemExit(f"no run {flags['--run']!r} in {where.describe()}; see: history")
        snapshot_id = run.snapshot_id
    if command == "history":
        out = history(table)
    elif command == "sql":
        out = tag_table.sql(table, args[1], snapshot_id)
    elif command == "show":
        out = show(table, args[1], snapshot_id)
    else:
        out = top(table, args[1], int(flags["--n"]), snapshot_id)
    if len(out) == 0 and command in ("show", "top"):
        raise SystemExit(f"no rows for {args[1]!r} in {where.describe()}")
    print("  ".join(out.column_names))
    print_table(out)


if __name__ == "__main__":
    main()
