"""The tag table: what the tag job writes beside the catalog, how to read it, and a small query tool.

``<root>/tags/`` is a versioned dataset (see ``versions``). A version holds, in long form, one row per
(track, tag): ``track_id``, ``tag``, ``score``, ``source`` (``human``: a catalog label, carried over
unchanged with score 1; ``model``: a probe's score for every tag), ``predicted`` (the score reached the
tag's threshold; always true for human labels) and provenance ``model_id``, ``probe_run_id``,
``tagged_at``. All model rows of a version come from one probe run (``--only-new`` carries over only
rows of the same run). Data rows live in ``<version>/rows/``; tracks that could not be tagged are listed
with the reason in ``<version>/errors/errors.parquet``.

    python -m musiclib.tags show TRACK_ID [--root ROOT]
    python -m musiclib.tags top TAG [--root ROOT] [--n 10]
    python -m musiclib.tags outputs [--root ROOT]     # what each job did, where the outputs are
    python -m musiclib.tags similar TRACK_ID [--root ROOT] [--n 10] [--model-id M]
    python -m musiclib.tags seed TAG [--examples ID,ID] [--confirm ID,ID] [--split train] [--root ROOT] [--n 10]

``similar`` and ``seed`` are nearest-neighbour queries over the embeddings (``musiclib.neighbors``);
``seed TAG --confirm ID,ID`` writes TAG as a human label of the confirmed tracks (and the examples) into
the catalog, where the next tune and tag runs read it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from musiclib import neighbors, progress, storage, versions
from musiclib.config import DEFAULT_ROOT, Layout, RayConfig, check
from musiclib.probes import ProbeSet

ROWS_DIR = "rows"
ERRORS_FILE = "errors/errors.parquet"

SCHEMA = pa.schema(
    [
        pa.field("track_id", pa.string(), nullable=False),
        pa.field("tag", pa.string(), nullable=False),
        pa.field("score", pa.float32()),
        pa.field("source", pa.string(), nullable=False),
        pa.field("predicted", pa.bool_()),
        pa.field("model_id", pa.string()),
        pa.field("probe_run_id", pa.string()),
        pa.field("tagged_at", pa.string()),
    ]
)
ERRORS_SCHEMA = pa.schema(
    [pa.field("track_id", pa.string(), nullable=False), pa.field("reason", pa.string())]
)


@dataclass
class TagConfig(RayConfig):
    """Write predicted tags, with scores and provenance, beside the catalog."""

    root: str = DEFAULT_ROOT
    probe_run_id: str = ""  # empty: the latest published tune run
    run_id: str = ""  # empty: derived from the inputs, so the same inputs give the same version
    only_new: bool = False  # tag only tracks without rows of this probe run in the latest version
    batch_size: int = 512
    concurrency: int = 1  # scoring actors
    summary_tags: int = 3  # long-tail tags whose most confident new tags the summary lists

    def validate(self) -> None:
        problems = RayConfig.problems(self)
        if self.batch_size < 1 or self.concurrency < 1 or self.summary_tags < 0:
            problems.append("--batch-size and --concurrency must be at least 1, --summary-tags at least 0")
        check("tag", problems)


def already_tagged(previous: versions.Manifest | None, model_id: str, probe_run_id: str) -> pa.Table:
    """Model rows of this probe run and model in the previous version: what ``--only-new`` carries over.

    Rows of another probe run (an older sweep of the same model included) are not carried, so their tracks
    are scored again with the current probe set and a version never mixes probe sets.
    """
    if previous is None:
        return SCHEMA.empty_table()
    rows = read_version(previous)
    return rows.filter(
        (pc.field("source") == "model")
        & (pc.field("model_id") == model_id)
        & (pc.field("probe_run_id") == probe_run_id)
    )


def embedding_errors(files: list[str], catalog_ids: list[str]) -> pa.Table:
    """Tracks with an embedding error (its reason) and catalog tracks with no embedding row at all."""
    emb = storage.read_parquet(files, ["track_id", "error"])
    failed = emb.filter(pc.is_valid(emb["error"]))
    seen = set(emb["track_id"].to_pylist())
    missing = [t for t in catalog_ids if t not in seen]
    return pa.table(
        {
            "track_id": failed["track_id"].to_pylist() + missing,
            "reason": [f"embedding error: {e}" for e in failed["error"].to_pylist()]
            + ["no embedding"] * len(missing),
        },
        schema=ERRORS_SCHEMA,
    )


def model_rows(table: pa.Table, probe_set: ProbeSet, probe_run_id: str, tagged_at: str) -> pa.Table:
    """Score a batch of embedding rows (no errors) with every tag: one matrix product, then long form."""
    n, n_tags = len(table), len(probe_set.tags)
    if n == 0:
        return SCHEMA.empty_table()
    dim = probe_set.weights.shape[0]
    flat = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    scores = probe_set.apply(flat.reshape(n, dim))
    return pa.table(
        {
            "track_id": np.repeat(np.asarray(table.column("track_id").to_pylist(), dtype=object), n_tags),
            "tag": np.tile(np.asarray(probe_set.tags, dtype=object), n),
            "score": scores.astype(np.float32).ravel(),
            "source": np.full(n * n_tags, "model", dtype=object),
            "predicted": probe_set.predict(scores).ravel(),
            "model_id": np.full(n * n_tags, probe_set.model_id, dtype=object),
            "probe_run_id": np.full(n * n_tags, probe_run_id, dtype=object),
            "tagged_at": np.full(n * n_tags, tagged_at, dtype=object),
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
        },
        schema=SCHEMA,
    )


def read_version(manifest: versions.Manifest, columns: list[str] | None = None) -> pa.Table:
    """The tag rows of one committed version (only the files its manifest lists)."""
    uris = [
        u
        for u, f in zip(manifest.file_uris(), manifest.files, strict=True)
        if "/" + ROWS_DIR + "/" in "/" + f.path
    ]
    return storage.read_parquet(uris, columns, SCHEMA)


def read_errors(manifest: versions.Manifest) -> pa.Table:
    """Tracks a version could not tag, with the reason."""
    uris = [
        u for u, f in zip(manifest.file_uris(), manifest.files, strict=True) if f.path.endswith(ERRORS_FILE)
    ]
    return storage.read_parquet(uris, schema=ERRORS_SCHEMA)


def read_latest(tags_root: str, columns: list[str] | None = None) -> pa.Table:
    """The rows of the version ``_latest`` points at; a clear error when nothing was tagged yet."""
    return read_version(versions.read_latest_manifest(tags_root), columns)


def show(tags_root: str, track_id: str) -> pa.Table:
    """Every tag row of one track: human labels first, then model scores, highest first."""
    table = read_latest(tags_root).filter(pc.field("track_id") == track_id)
    return table.sort_by([("source", "ascending"), ("score", "descending")])


def top(tags_root: str, tag: str, n: int = 10) -> pa.Table:
    """The ``n`` tracks the model scores highest for ``tag``, with whether a human labeled them so."""
    table = read_latest(tags_root)
    rows = table.filter((pc.field("tag") == tag) & (pc.field("source") == "model"))
    human = set(
        table.filter((pc.field("tag") == tag) & (pc.field("source") == "human"))["track_id"].to_pylist()
    )
    best = rows.sort_by([("score", "descending"), ("track_id", "ascending")]).slice(0, n)
    return best.append_column("human_label", pa.array([t in human for t in best["track_id"].to_pylist()]))


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


def _print(table: pa.Table) -> None:
    """One line per row, floats to three decimals, nulls blank."""
    for row in table.to_pylist():
        cells = ["" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()]
        print("  ".join(cells))


def print_outputs(layout: Layout) -> None:
    """The chain's table (one row per job, from the summaries the jobs wrote), then where the latest sweep
    report, budget curve, probe set and tag table of a root are."""
    runs = progress.read_summaries(layout.root)
    if runs:
        print(progress.chain_table(runs))
        print()
    probes_run = versions.latest_version(layout.probes)
    if probes_run is not None:
        run_dir = versions.version_uri(layout.probes, probes_run)
        for name in ("report.md", "budget_curve.png", "probe_set.safetensors"):
            print(f"{name:<22} {storage.join(run_dir, name)}")
    tags_version = versions.latest_version(layout.tags)
    if tags_version is not None:
        print(f"{'tag table':<22} {versions.version_uri(layout.tags, tags_version)}")
    if probes_run is None and tags_version is None:
        raise SystemExit(f"no probe run and no tag version under {layout.root} yet")


def main(argv: list[str] | None = None) -> None:
    """``show TRACK_ID``, ``top TAG`` or ``outputs`` against the latest versions under ``--root``."""
    args = list(sys.argv[1:] if argv is None else argv)
    root, n = DEFAULT_ROOT, 10
    for flag in ("--root", "--n"):
        if flag in args:
            i = args.index(flag)
            value = args[i + 1]
            del args[i : i + 2]
            root, n = (value, n) if flag == "--root" else (root, int(value))
    if args == ["outputs"]:
        print_outputs(Layout(root))
        return
    if args and args[0] in ("similar", "seed"):
        neighbors_command(args, root, n)
        return
    if len(args) != 2 or args[0] not in ("show", "top"):
        raise SystemExit(
            "usage: python -m musiclib.tags show TRACK_ID | top TAG | outputs | similar TRACK_ID | seed TAG "
            "[--examples ID,ID] [--confirm ID,ID] [--root ROOT] [--n N]"
        )
    tags_root = Layout(root).tags
    table = show(tags_root, args[1]) if args[0] == "show" else top(tags_root, args[1], n)
    if len(table) == 0:
        raise SystemExit(f"no rows for {args[1]!r} in the latest tag version under {tags_root}")
    print("  ".join(table.column_names))
    _print(table)


def neighbors_command(args: list[str], root: str, n: int) -> None:
    """``similar TRACK_ID`` and ``seed TAG [--examples] [--confirm] [--split]``: options to ``neighbors`` calls.

    Bad input (an unknown track or tag, an example without an embedding) ends with one line naming it.
    """
    options = {"--examples": "", "--confirm": "", "--model-id": "", "--split": "train"}
    for flag in options:
        if flag in args:
            i = args.index(flag)
            if i + 1 >= len(args):
                raise SystemExit(f"{flag} needs a value")
            options[flag] = args[i + 1]
            del args[i : i + 2]
    if len(args) != 2 or (args[0] == "similar" and (options["--examples"] or options["--confirm"])):
        raise SystemExit(
            "usage: python -m musiclib.tags similar TRACK_ID | seed TAG [--examples ID,ID] [--confirm ID,ID] "
            "[--split train] [--model-id M] [--root ROOT] [--n N]"
        )
    layout = Layout(root)
    examples = [t for t in options["--examples"].split(",") if t]
    confirmed = [t for t in options["--confirm"].split(",") if t]
    try:
        if confirmed:
            change = neighbors.add_labels(layout.catalog, args[1], examples + confirmed, options["--split"])
            print(
                f"labeled {len(change.added)} track(s) {args[1]!r} in {layout.catalog} "
                f"({len(change.already)} had it; {len(change.split_set)} without a split put in "
                f"{options['--split']!r}); the next tune and tag runs use the label"
            )
            return
        found = neighbors.load(root, options["--model-id"])
        labels = neighbors.catalog_labels(layout.catalog)
        if args[0] == "similar":
            table = neighbors.similar(found, labels, layout.catalog, args[1], n)
        else:
            table = neighbors.seed(found, labels, layout.catalog, args[1], examples, n)
    except (neighbors.NeighborsError, storage.StorageError) as exc:
        raise SystemExit(str(exc).splitlines()[0]) from exc
    print(f"# {found.source}")
    print("  ".join(table.column_names))
    _print(table)


if __name__ == "__main__":
    main()
