"""Nearest tracks by cosine similarity over embeddings: the index dataset, ``similar``, seeding a tag.

Nearest is measured where the probes look (``Space``): in the representation of the latest probe run of
the model (the learned embedding, the log-mel statistics, or both side by side) after that probe set's
normalisation, so the tracks ``seed`` finds for a tag are near in the space its probe scores in (and
``suggest`` keeps apart); with no probe run of the model, in the learned embedding as it is.

The index itself (exact search, faiss IVF, its safetensors file) is ``musiclib.tag.index``; ``Neighbors``
pairs an index with the track ids of its rows (``ids.parquet`` beside it) and answers ``similar`` and
``seed``. The index job (``jobs/index.py``) writes ``<root>/index/<model_id>/`` as a versioned dataset
keyed by the embeddings version and the space; ``load`` uses it when both match the latest embeddings
and probe run, and otherwise searches the embeddings exactly.

``command`` is the query tool's ``similar`` and ``seed`` (``python -m musiclib.tag.tags``); ``seed TAG
--confirm ID,ID`` writes the tag into the catalog (``catalog.add_labels``), where the tune and tag jobs
read human labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from musiclib import catalog
from musiclib.core import storage, versions
from musiclib.core.config import DEFAULT_ROOT, ConfigError, Layout, check, take_flags
from musiclib.core.outputs import print_table
from musiclib.embed import table as embeddings_table
from musiclib.probe import probes
from musiclib.tag.index import (
    EXACT_BELOW,
    NPROBE,
    ExactIndex,
    Index,
    NeighborsError,
    from_bytes,
    normalize,
    to_bytes,
)
from musiclib.train import models

INDEX_FILE = "index.safetensors"
IDS_FILE = "ids.parquet"


# --------------------------------------------------------------------------- the index dataset


@dataclass
class IndexConfig:
    """Build the nearest-neighbour index over a model's latest embeddings and store it beside them.

    A driver job, no Ray: faiss builds in one process with ``--threads`` threads (0: every core).
    """

    root: str = DEFAULT_ROOT
    model_id: str = ""  # empty: the latest exported model
    kind: str = "auto"  # auto: exact below --exact-below tracks, else ivf
    exact_below: int = EXACT_BELOW  # auto: catalogs with fewer tracks are searched exactly
    nlist: int = 0  # IVF cells; 0: 4 * sqrt(tracks)
    nprobe: int = NPROBE  # cells scanned per query
    train_size: int = 100_000  # vectors sampled for k-means
    threads: int = 0  # faiss threads (0: every core)

    def validate(self) -> None:
        problems = []
        if self.kind not in ("auto", "exact", "ivf"):
            problems.append(f"--kind must be auto, exact or ivf, got {self.kind!r}")
        for name in ("exact_below", "nlist", "threads"):
            if getattr(self, name) < 0:
                problems.append(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        for name in ("nprobe", "train_size"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        check("index", problems)


@dataclass
class Space:
    """Where nearest tracks are measured: ``representation`` after the normaliser ``norm`` of probe run
    ``probe_run_id`` (cosine over ``norm(x)``), or the learned embedding as it is (no probe run)."""

    representation: str = "embedding"
    norm: probes.Normalizer | None = None
    probe_run_id: str = ""

    def vectors(self, rows: pa.Table) -> np.ndarray:
        """The vectors of usable rows (holding ``embeddings_table.columns(representation)``) in this space."""
        x = embeddings_table.matrix(rows, self.representation)
        return x if self.norm is None else self.norm(x)

    def describe(self) -> str:
        if not self.probe_run_id:
            return "the learned embedding (no probe run of the model)"
        return f"{self.representation}, normalised as probe run {self.probe_run_id}"


def find_space(layout: Layout, model_id: str) -> Space:
    """The space of the latest probe run when it is of ``model_id``, else the learned embedding."""
    run_id = versions.latest_version(layout.probes)
    if run_id is None:
        return Space()
    uri = storage.join(versions.version_uri(layout.probes, run_id), "probe_set.safetensors")
    probe_set = probes.ProbeSet.load(uri)
    if probe_set.model_id != model_id:
        return Space()
    return Space(probe_set.representation, probe_set.norm, run_id)


def index_uri(layout: Layout, model_id: str) -> str:
    """Where a model's index dataset lives, ``<root>/index/<model_id>``: one version per embeddings
    version and space, beside the model's embeddings."""
    return storage.join(layout.index, model_id)


def derive_run_id(cfg: IndexConfig, embedding_version: str, space: Space) -> str:
    """``index-<digest>`` of the embeddings version, the space (representation and probe run) and the build
    settings: rebuilt only when one of them changes."""
    settings = [cfg.kind, cfg.exact_below, cfg.nlist, cfg.nprobe, cfg.train_size]
    return versions.digest_version(
        "index", [embedding_version, space.representation, space.probe_run_id, settings]
    )


def usable_embeddings(files: list[str], space: Space) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """``(track_ids, vectors, errors)`` of embedding files: rows with their vectors in ``space``, and why
    the others have none; a one-line ``ConfigError`` when the files cannot give the space's representation."""
    embeddings_table.require(space.representation, embeddings_table.offered(files), "these embeddings")
    rows = storage.read_parquet(files, embeddings_table.columns(space.representation))
    ok = embeddings_table.usable_mask(rows)
    bad = rows.filter(pc.invert(ok))
    errors = dict(zip(bad["track_id"].to_pylist(), (e or "no vector" for e in bad["error"].to_pylist())))
    good = rows.filter(ok)
    return np.asarray(good["track_id"].to_pylist(), dtype=object), space.vectors(good), errors


def write_version(
    dataset: str, version: str, index: Index, track_ids: np.ndarray, config: dict, extra: dict
) -> versions.Manifest:
    """Write ``index.safetensors`` and ``ids.parquet`` (the track id of each row), then publish the version."""
    folder = versions.version_uri(dataset, version)
    index_file, ids_file = storage.join(folder, INDEX_FILE), storage.join(folder, IDS_FILE)
    storage.write_bytes(index_file, to_bytes(index))
    storage.write_parquet(pa.table({"track_id": pa.array(track_ids.tolist(), pa.string())}), ids_file)
    n = len(track_ids)
    return versions.publish(dataset, version, [index_file, ids_file], [n, n], config=config, extra=extra)


# --------------------------------------------------------------------------- nearest tracks


@dataclass
class Neighbors:
    """An index and the track id of each of its rows; ``source`` says which index or embeddings it is."""

    index: Index
    track_ids: np.ndarray
    model_id: str
    source: str

    def __post_init__(self) -> None:
        self._row = {t: i for i, t in enumerate(self.track_ids)}

    def __contains__(self, track_id: str) -> bool:
        return track_id in self._row

    def rows(self, track_ids: Sequence[str]) -> np.ndarray:
        """Index rows of tracks that all have one (``require`` checks that first)."""
        return np.array([self._row[t] for t in track_ids], np.int64)

    def nearest(self, query: np.ndarray, n: int, exclude: set[str]) -> tuple[list[str], list[float]]:
        """The ``n`` tracks nearest one unit query, leaving out ``exclude``: ids and cosine similarities."""
        if n < 1:
            raise NeighborsError(f"--n must be at least 1, got {n}")
        scores, rows = self.index.search(query[None], n + len(exclude))
        pairs = [(self.track_ids[r], float(s)) for s, r in zip(scores[0], rows[0], strict=True) if r >= 0]
        kept = [(t, s) for t, s in pairs if t not in exclude][:n]
        return [t for t, _ in kept], [s for _, s in kept]


def load(root: str, model_id: str = "") -> Neighbors:
    """The index of the latest embeddings of ``model_id`` (default: the latest model) under ``root``, in the
    space of the latest probe run (``find_space``).

    Uses the index job's latest version when it was built from the current embeddings in that space;
    otherwise (no index yet, embeddings or a probe run newer than it) searches the embeddings exactly,
    which is right for small catalogs and slower for large ones (``make index`` builds the index).
    """
    layout = Layout(root)
    model_id = models.model_id_or_latest(layout.models, model_id)
    embeddings = embeddings_table.dataset_uri(layout.embeddings, model_id)
    if versions.latest_version(embeddings) is None:
        raise NeighborsError(f"no embeddings of {model_id} under {layout.embeddings}: run embed first")
    emb = versions.read_latest_manifest(embeddings)
    space = find_space(layout, model_id)
    dataset = index_uri(layout, model_id)
    if versions.latest_version(dataset) is not None:
        manifest = versions.read_latest_manifest(dataset)
        extra = manifest.extra  # indexes built before there were spaces: the learned embedding, no probe run
        built = (extra.get("representation", "embedding"), extra.get("probe_run_id", ""))
        if extra.get("embedding_version") == emb.version and built == (
            space.representation,
            space.probe_run_id,
        ):
            folder = versions.version_uri(dataset, manifest.version)
            index = from_bytes(storage.read_bytes(storage.join(folder, INDEX_FILE)), f"index {folder}")
            ids = storage.read_parquet([storage.join(folder, IDS_FILE)])["track_id"].to_pylist()
            if len(ids) != len(index):
                raise NeighborsError(f"index {folder}: {len(ids)} track ids for {len(index)} vectors")
            return Neighbors(index, np.asarray(ids, dtype=object), model_id, f"index {folder}")
    ids, vectors, _ = usable_embeddings(emb.file_uris(), space)
    if len(ids) == 0:
        raise NeighborsError(f"no track has an embedding of {model_id} in version {emb.version}")
    source = (
        f"exact search over embeddings {emb.version} of {model_id} in {space.describe()} "
        "(no index built from them)"
    )
    return Neighbors(ExactIndex(normalize(vectors)), ids, model_id, source)


def require(
    found: Neighbors, track_ids: Sequence[str], labels: dict[str, list[str]], catalog_uri: str
) -> None:
    """A ``NeighborsError`` naming the first track that is not in the catalog or has no usable embedding."""
    for t in track_ids:
        if t not in labels:
            raise NeighborsError(f"track {t!r} is not in the catalog {catalog_uri}")
        if t not in found:
            raise NeighborsError(
                f"track {t!r} has no usable embedding of {found.model_id}: embed it first, or choose another track"
            )


def similar(
    found: Neighbors, labels: dict[str, list[str]], catalog_uri: str, track_id: str, n: int
) -> pa.Table:
    """The ``n`` tracks nearest ``track_id`` (itself left out): ``track_id``, ``score`` (cosine), ``tags``."""
    require(found, [track_id], labels, catalog_uri)
    query = found.index.vectors(found.rows([track_id]))[0]
    ids, scores = found.nearest(query, n, {track_id})
    return pa.table({"track_id": ids, "score": scores, "tags": [",".join(labels.get(t, [])) for t in ids]})


def seed(
    found: Neighbors,
    labels: dict[str, list[str]],
    catalog_uri: str,
    tag: str,
    examples: Sequence[str],
    n: int,
) -> pa.Table:
    """Candidates for ``tag``: the ``n`` tracks nearest the examples' mean direction, examples left out.

    Without examples the tracks already labeled ``tag`` are the examples (an unknown tag is an error).
    ``score`` is the cosine similarity to that mean; ``labeled`` says whether a person already gave the tag.
    """
    if reason := catalog.bad_tag(tag):
        raise NeighborsError(f"bad tag: {reason}")
    if not examples:
        examples = [t for t, tags in labels.items() if tag in tags and t in found]
        if not examples:
            raise NeighborsError(
                f"unknown tag {tag!r}: no catalog track with an embedding is labeled with it; "
                f"give --examples ID,ID to seed a new tag"
            )
    require(found, examples, labels, catalog_uri)
    query = normalize(normalize(found.index.vectors(found.rows(examples))).mean(axis=0, keepdims=True))[0]
    ids, scores = found.nearest(query, n, set(examples))
    return pa.table({"track_id": ids, "score": scores, "labeled": [tag in labels.get(t, []) for t in ids]})


# --------------------------------------------------------------------------- the query tool's commands

USAGE = (
    "usage: python -m musiclib.tag.tags similar TRACK_ID | seed TAG [--examples ID,ID] [--confirm ID,ID] "
    "[--split train] [--model-id M] [--root ROOT] [--n N]"
)


def command(args: list[str], root: str, n: int) -> None:
    """``similar TRACK_ID`` and ``seed TAG [--examples] [--confirm] [--split]``: options to the calls above.

    Bad input (an unknown track or tag, an example without an embedding) ends with one line naming it.
    """
    options = {"--examples": "", "--confirm": "", "--model-id": "", "--split": "train"}
    take_flags(args, options, USAGE)
    if len(args) != 2 or (args[0] == "similar" and (options["--examples"] or options["--confirm"])):
        raise SystemExit(USAGE)
    layout = Layout(root)
    examples = [t for t in options["--examples"].split(",") if t]
    confirmed = [t for t in options["--confirm"].split(",") if t]
    try:
        if confirmed:
            change = catalog.add_labels(layout.catalog, args[1], examples + confirmed, options["--split"])
            print(
                f"labeled {len(change.added)} track(s) {args[1]!r} in {layout.catalog} "
                f"({len(change.already)} had it; {len(change.split_set)} without a split put in "
                f"{options['--split']!r}); the next tune and tag runs use the label"
            )
            return
        found = load(root, options["--model-id"])
        labels = catalog.track_labels(layout.catalog)
        if args[0] == "similar":
            rows = similar(found, labels, layout.catalog, args[1], n)
        else:
            rows = seed(found, labels, layout.catalog, args[1], examples, n)
    except (NeighborsError, ConfigError, catalog.CatalogError, storage.StorageError) as exc:
        raise SystemExit(str(exc).splitlines()[0]) from exc
    print(f"# {found.source}")
    print("  ".join(rows.column_names))
    print_table(rows)
