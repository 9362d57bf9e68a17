"""Nearest tracks by cosine similarity over embeddings: exact search, an approximate index, seeding a tag.

Two indexes behind one interface (``search``, ``vectors``, ``to_bytes``/``from_bytes``):

- ``ExactIndex``: every query against every vector, by blocked matrix products (``exact_search``); the
  reference, and the index of small catalogs (below ``EXACT_BELOW`` vectors, where a scan is fast enough).
- ``IVFIndex``: faiss's inverted file (IVF-Flat, inner product on unit vectors): k-means cells, each query
  scans the ``nprobe`` nearest cells. Chosen over HNSW (hnswlib, usearch) by ``bench/bench_ann.py``;
  numbers, recall and the threshold are in ``docs/BENCHMARKS.md``.

An index file is safetensors (plain arrays and string metadata; never pickle, never faiss's own
serialiser), checked for shapes, dtypes and a consistent cell layout before faiss sees it, so an index
read from a bucket cannot run code. Rows of an index are row numbers; ``Neighbors`` pairs an index with
the track ids of its rows (``ids.parquet`` beside it) and answers ``similar`` and ``seed``.

The index job (``jobs/index.py``) writes ``<root>/index/<model_id>/`` as a versioned dataset keyed by the
embeddings version; ``load`` uses it when it matches the latest embeddings and otherwise searches the
embeddings exactly. ``add_labels`` writes confirmed tracks' new tag into the catalog by compare-and-swap,
where the tune and tag jobs read human labels.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from musiclib import catalog
from musiclib.core import storage, versions
from musiclib.core.config import DEFAULT_ROOT, Layout, check
from musiclib.embed import embedder
from musiclib.train import models

FORMAT = "musiclib-neighbors/1"
INDEX_FILE = "index.safetensors"
IDS_FILE = "ids.parquet"
EXACT_BELOW = 20_000  # catalogs smaller than this are scanned exactly (docs/BENCHMARKS.md, "ann")
NPROBE = 32
BLOCK_ROWS = 32768  # vectors per matrix product in exact_search: bounds the scores held at once
QUERY_BLOCK = 1024


class NeighborsError(ValueError):
    """Bad input to a nearest-neighbour query (unknown track, no embedding, unknown tag) or a bad index file."""


# --------------------------------------------------------------------------- exact search


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length as float32 (cosine similarity is then an inner product); zero rows stay 0.

    Rows already of unit length come back as they are, not copied (1 M x 512 floats are 2 GB).
    """
    x = np.asarray(x, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]  # no temporary as large as x
    if np.all(np.abs(norms - 1) < 1e-5):
        return x
    return x / np.where(norms > 0, norms, 1.0)


def exact_search(
    base: np.ndarray, queries: np.ndarray, k: int, block_rows: int = BLOCK_ROWS
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` rows of ``base`` with the largest inner product with each query: ``(scores, rows)``, best first.

    One matrix product per block of ``block_rows`` base rows (and of ``QUERY_BLOCK`` queries), keeping a
    running top-k, so memory stays bounded whatever the size of ``base``. Equal scores are ordered by row.
    """
    if k < 1:
        raise NeighborsError(f"the number of neighbours must be at least 1, got {k}")
    base = np.asarray(base, dtype=np.float32)
    queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    k = min(k, len(base))
    scores = np.empty((len(queries), k), np.float32)
    rows = np.empty((len(queries), k), np.int64)
    for q0 in range(0, len(queries), QUERY_BLOCK):
        q = queries[q0 : q0 + QUERY_BLOCK]
        best_s = np.empty((len(q), 0), np.float32)
        best_i = np.empty((len(q), 0), np.int64)
        for start in range(0, len(base), block_rows):
            s = q @ base[start : start + block_rows].T
            kk = min(k, s.shape[1])
            part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
            best_s = np.concatenate([best_s, np.take_along_axis(s, part, axis=1)], axis=1)
            best_i = np.concatenate([best_i, part + start], axis=1)
            if best_s.shape[1] > k:
                keep = np.argpartition(-best_s, k - 1, axis=1)[:, :k]
                best_s = np.take_along_axis(best_s, keep, axis=1)
                best_i = np.take_along_axis(best_i, keep, axis=1)
        order = np.lexsort((best_i, -best_s), axis=1)
        scores[q0 : q0 + len(q)] = np.take_along_axis(best_s, order, axis=1)
        rows[q0 : q0 + len(q)] = np.take_along_axis(best_i, order, axis=1)
    return scores, rows


# --------------------------------------------------------------------------- indexes


class ExactIndex:
    """Unit vectors in row order, searched by ``exact_search``."""

    kind = "exact"

    def __init__(self, vectors: np.ndarray):
        self._vectors = np.ascontiguousarray(vectors, dtype=np.float32)

    def __len__(self) -> int:
        return len(self._vectors)

    @property
    def dim(self) -> int:
        return self._vectors.shape[1]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, rows)`` of the ``k`` nearest rows of each unit query, best first."""
        return exact_search(self._vectors, queries, k)

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        return self._vectors[np.asarray(rows)]

    def arrays(self) -> dict[str, np.ndarray]:
        return {"vectors": self._vectors}


class IVFIndex:
    """faiss IVF-Flat over unit vectors: ``centroids`` of the cells, each cell's vectors and row numbers.

    Built from plain arrays (``build`` or a file), vectors grouped by cell: ``rows[i]`` is the row number
    of the i-th stored vector and ``list_sizes[c]`` the number of vectors in cell ``c``. The i-th stored
    vector is ``vectors[order[i]]`` when ``order`` is given (``build``: no grouped copy), else ``vectors[i]``.
    """

    kind = "ivf"

    def __init__(
        self,
        centroids: np.ndarray,
        list_sizes: np.ndarray,
        rows: np.ndarray,
        vectors: np.ndarray,
        nprobe: int,
        order: np.ndarray | None = None,
    ):
        import faiss

        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self.list_sizes = np.asarray(list_sizes, dtype=np.int64)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.nprobe = nprobe
        self._starts = np.concatenate([[0], np.cumsum(self.list_sizes)])
        self._position = np.empty_like(self.rows)
        self._position[self.rows] = np.arange(len(self.rows))
        nlist, dim = self.centroids.shape
        quantizer = faiss.IndexFlatIP(dim)
        quantizer.add(self.centroids)
        self._index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        self._index.own_fields = True
        quantizer.this.disown()
        self._index.is_trained = True
        cells = np.repeat(np.arange(nlist, dtype=np.int64), self.list_sizes)
        for start in range(0, len(self.rows), 1 << 18):  # bounded temporary copies
            stop = min(len(self.rows), start + (1 << 18))
            chunk = vectors[start:stop] if order is None else vectors[order[start:stop]]
            x = np.ascontiguousarray(chunk, dtype=np.float32)
            ids = np.ascontiguousarray(self.rows[start:stop])
            a = np.ascontiguousarray(cells[start:stop])
            self._index.add_core(stop - start, faiss.swig_ptr(x), faiss.swig_ptr(ids), faiss.swig_ptr(a))
        self._index.nprobe = nprobe

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def dim(self) -> int:
        return self.centroids.shape[1]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, rows)`` of the ``k`` nearest rows found in the ``nprobe`` cells nearest each unit query."""
        import faiss

        if k < 1:
            raise NeighborsError(f"the number of neighbours must be at least 1, got {k}")
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        threads = faiss.omp_get_max_threads()
        if len(q) == 1:  # nothing to share among threads; their barrier costs milliseconds on a busy node
            faiss.omp_set_num_threads(1)
        try:
            return self._index.search(q, min(k, len(self)))
        finally:
            faiss.omp_set_num_threads(threads)

    def _cell(self, c: int) -> np.ndarray:
        """The stored vectors of cell ``c`` (a copy out of faiss's inverted list)."""
        import faiss

        n = int(self.list_sizes[c])
        codes = faiss.rev_swig_ptr(self._index.invlists.get_codes(int(c)), n * self.dim * 4)
        return np.frombuffer(bytes(codes), np.float32).reshape(n, self.dim)

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        pos = self._position[np.asarray(rows)]
        cells = np.searchsorted(self._starts, pos, side="right") - 1
        return np.stack([self._cell(c)[p - self._starts[c]] for c, p in zip(cells, pos, strict=True)])

    def arrays(self) -> dict[str, np.ndarray]:
        """The index as plain arrays; the vectors come out of faiss's lists, checked against ``rows``."""
        import faiss

        vectors = np.empty((len(self), self.dim), np.float32)
        for c in range(len(self.list_sizes)):
            lo, hi = self._starts[c], self._starts[c + 1]
            ids = faiss.rev_swig_ptr(self._index.invlists.get_ids(int(c)), int(hi - lo))
            if not np.array_equal(np.asarray(ids), self.rows[lo:hi]):
                raise NeighborsError(f"cell {c} of the faiss index does not hold the rows it was built with")
            vectors[lo:hi] = self._cell(c)
        return {
            "centroids": self.centroids,
            "list_sizes": self.list_sizes,
            "rows": self.rows,
            "vectors": vectors,
        }


Index = ExactIndex | IVFIndex


def build(
    vectors: np.ndarray,
    kind: str = "auto",
    exact_below: int = EXACT_BELOW,
    nlist: int = 0,
    nprobe: int = NPROBE,
    train_size: int = 100_000,
    seed: int = 0,
) -> Index:
    """An index over ``vectors`` (normalised here): exact below ``exact_below`` rows with ``kind="auto"``.

    IVF: ``nlist`` cells (0: ``4 * sqrt(n)``) from spherical k-means on ``train_size`` sampled rows, then
    every vector assigned to its nearest cell.
    """
    if kind not in ("auto", "exact", "ivf"):
        raise NeighborsError(f"unknown index kind {kind!r}: use auto, exact or ivf")
    x = normalize(vectors)
    if len(x) == 0:
        raise NeighborsError("no vectors to index")
    if kind == "exact" or (kind == "auto" and len(x) < exact_below):
        return ExactIndex(x)
    import faiss

    nlist = nlist or max(1, int(4 * np.sqrt(len(x))))
    nlist = min(nlist, len(x))
    rng = np.random.default_rng(seed)
    sample = x[np.sort(rng.choice(len(x), size=min(len(x), max(train_size, nlist)), replace=False))]
    kmeans = faiss.Kmeans(x.shape[1], nlist, niter=10, spherical=True, seed=seed, max_points_per_centroid=256)
    kmeans.train(sample)
    centroids = kmeans.centroids
    quantizer = faiss.IndexFlatIP(x.shape[1])
    quantizer.add(centroids)
    cells = np.empty(len(x), np.int64)
    for start in range(0, len(x), 1 << 16):
        cells[start : start + (1 << 16)] = quantizer.search(x[start : start + (1 << 16)], 1)[1][:, 0]
    order = np.argsort(cells, kind="stable")
    sizes = np.bincount(cells, minlength=nlist)
    return IVFIndex(centroids, sizes, order, x, nprobe, order)


# --------------------------------------------------------------------------- the index file


def to_bytes(index: Index) -> bytes:
    """The index as safetensors: its arrays, and its kind, format and search settings as metadata."""
    meta = {"format": FORMAT, "kind": index.kind}
    if isinstance(index, IVFIndex):
        meta["nprobe"] = str(index.nprobe)
    return st_save(index.arrays(), metadata=meta)


def from_bytes(data: bytes, name: str = "index", nprobe: int | None = None) -> Index:
    """An index from ``to_bytes`` output, every array checked first; ``NeighborsError`` naming ``name`` if bad."""
    try:
        arrays = st_load(data)
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
        meta = header.get("__metadata__") or {}
    except Exception as exc:  # safetensors raises its own errors for truncated or malformed files
        raise NeighborsError(f"{name} is not a readable safetensors index: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise NeighborsError(f"{name}: format {meta.get('format')!r}, expected {FORMAT!r}")
    vectors = _array(arrays, "vectors", np.float32, 2, name)
    if not np.isfinite(vectors).all():
        raise NeighborsError(f"{name}: vectors hold NaN or infinite values")
    if meta.get("kind") == "exact":
        return ExactIndex(vectors)
    if meta.get("kind") != "ivf":
        raise NeighborsError(f"{name}: unknown index kind {meta.get('kind')!r}")
    centroids = _array(arrays, "centroids", np.float32, 2, name)
    sizes = _array(arrays, "list_sizes", np.int64, 1, name)
    rows = _array(arrays, "rows", np.int64, 1, name)
    n = len(vectors)
    if centroids.shape[1] != vectors.shape[1] or len(sizes) != len(centroids) or len(rows) != n:
        raise NeighborsError(
            f"{name}: inconsistent shapes: vectors {vectors.shape}, centroids {centroids.shape}, "
            f"list_sizes {sizes.shape}, rows {rows.shape}"
        )
    if (sizes < 0).any() or sizes.sum() != n:
        raise NeighborsError(f"{name}: list sizes do not add up to the {n} vectors")
    if n and ((rows < 0).any() or (rows >= n).any() or (np.bincount(rows, minlength=n) != 1).any()):
        raise NeighborsError(f"{name}: rows are not a permutation of 0..{n - 1}")
    if nprobe is None:
        raw = meta.get("nprobe", str(NPROBE))
        nprobe = int(raw) if raw.isdigit() else 0
    if nprobe < 1:
        raise NeighborsError(f"{name}: nprobe must be a positive integer, got {meta.get('nprobe')!r}")
    return IVFIndex(centroids, sizes, rows, vectors, nprobe)


def _array(arrays: dict[str, np.ndarray], key: str, dtype: type, ndim: int, name: str) -> np.ndarray:
    a = arrays.get(key)
    if a is None or a.dtype != dtype or a.ndim != ndim:
        got = "missing" if a is None else f"{a.dtype} with {a.ndim} dimension(s)"
        raise NeighborsError(f"{name}: array {key!r} is {got}, expected {np.dtype(dtype)} with {ndim}")
    return a


# --------------------------------------------------------------------------- the index dataset


@dataclass
class IndexConfig:
    """Build the nearest-neighbour index over a model's latest embeddings and store it beside them.

    A driver job, no Ray: faiss builds in one process with ``--threads`` threads (0: every core).
    """

    root: str = DEFAULT_ROOT
    model_id: str = ""  # empty: the latest exported model
    kind: str = "auto"  # auto: exact below --exact-below tracks, else ivf
    exact_below: int = EXACT_BELOW
    nlist: int = 0  # IVF cells; 0: 4 * sqrt(tracks)
    nprobe: int = NPROBE  # cells scanned per query
    train_size: int = 100_000  # vectors sampled for k-means
    threads: int = 0

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


def dataset_uri(root: str, model_id: str) -> str:
    """``<root>/index/<model_id>``: one versioned dataset per model, beside its embeddings."""
    return storage.join(Layout(root).index, model_id)


def derive_run_id(cfg: IndexConfig, embedding_version: str) -> str:
    """``index-<digest>`` of the embeddings version and the build settings: rebuilt only when either changes."""
    settings = [cfg.kind, cfg.exact_below, cfg.nlist, cfg.nprobe, cfg.train_size]
    return versions.digest_version("index", [embedding_version, settings])


def usable_embeddings(files: list[str]) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """``(track_ids, vectors, errors)`` of embedding files: rows with a vector, and why the others have none."""
    table = storage.read_parquet(files, ["track_id", "embedding", "error"])
    ok = pc.and_(pc.is_null(table["error"]), pc.is_valid(table["embedding"]))
    bad = table.filter(pc.invert(ok))
    errors = dict(zip(bad["track_id"].to_pylist(), (e or "no vector" for e in bad["error"].to_pylist())))
    good = table.filter(ok)
    ids = np.asarray(good["track_id"].to_pylist(), dtype=object)
    if len(good) == 0:
        return ids, np.empty((0, 0), np.float32), errors
    flat = good["embedding"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return ids, flat.reshape(len(good), -1).astype(np.float32, copy=False), errors


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
    """The index of the latest embeddings of ``model_id`` (default: the latest model) under ``root``.

    Uses the index job's latest version when it was built from the current embeddings; otherwise (no
    index yet, or embeddings newer than it) searches the embeddings exactly, which is right for small
    catalogs and slower for large ones (``make index`` builds the index).
    """
    layout = Layout(root)
    model_id = models.model_id_or_latest(layout.models, model_id)
    embeddings = embedder.dataset_uri(layout.embeddings, model_id)
    if versions.latest_version(embeddings) is None:
        raise NeighborsError(f"no embeddings of {model_id} under {layout.embeddings}: run embed first")
    emb = versions.read_latest_manifest(embeddings)
    dataset = dataset_uri(root, model_id)
    if versions.latest_version(dataset) is not None:
        manifest = versions.read_latest_manifest(dataset)
        if manifest.extra.get("embedding_version") == emb.version:
            folder = versions.version_uri(dataset, manifest.version)
            index = from_bytes(storage.read_bytes(storage.join(folder, INDEX_FILE)), f"index {folder}")
            ids = storage.read_parquet([storage.join(folder, IDS_FILE)])["track_id"].to_pylist()
            if len(ids) != len(index):
                raise NeighborsError(f"index {folder}: {len(ids)} track ids for {len(index)} vectors")
            return Neighbors(index, np.asarray(ids, dtype=object), model_id, f"index {folder}")
    ids, vectors, _ = usable_embeddings(emb.file_uris())
    if len(ids) == 0:
        raise NeighborsError(f"no track has an embedding of {model_id} in version {emb.version}")
    source = f"exact search over embeddings {emb.version} of {model_id} (no index built from them)"
    return Neighbors(ExactIndex(normalize(vectors)), ids, model_id, source)


def catalog_labels(catalog_uri: str) -> dict[str, list[str]]:
    """Every catalog track's human labels, by track id."""
    table = catalog.read(catalog_uri, columns=["track_id", "tags"])
    return dict(zip(table["track_id"].to_pylist(), (t or [] for t in table["tags"].to_pylist())))


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


# --------------------------------------------------------------------------- confirmed labels


@dataclass
class LabelChange:
    """What ``add_labels`` did: tracks that got the tag, tracks that had it, tracks given a split."""

    added: list[str]
    already: list[str]
    split_set: list[str]


def with_label(
    table: pa.Table, tag: str, track_ids: Sequence[str], split: str
) -> tuple[pa.Table, LabelChange]:
    """``table`` (a catalog) with ``tag`` added to the tags of ``track_ids``; tracks without a split get
    ``split``, so that tune uses the label. Every other column and row is kept as it was."""
    if reason := catalog.bad_tag(tag):
        raise NeighborsError(f"bad tag: {reason}")
    if split not in catalog.SPLITS:
        raise NeighborsError(f"unknown split {split!r}: use one of {', '.join(catalog.SPLITS)}")
    wanted = set(track_ids)
    ids = table["track_id"].to_pylist()
    unknown = sorted(wanted - set(ids))
    if unknown:
        raise NeighborsError(f"track {unknown[0]!r} is not in the catalog ({len(unknown)} unknown id(s))")
    tags = table["tags"].to_pylist()
    splits = table["split"].to_pylist()
    change = LabelChange([], [], [])
    for i, t in enumerate(ids):
        if t not in wanted:
            continue
        if tag in (tags[i] or []):
            change.already.append(t)
        else:
            tags[i] = [*(tags[i] or []), tag]
            change.added.append(t)
        if splits[i] is None:
            splits[i] = split
            change.split_set.append(t)
    table = table.set_column(
        table.column_names.index("tags"), "tags", pa.array(tags, table.schema.field("tags").type)
    )
    table = table.set_column(
        table.column_names.index("split"), "split", pa.array(splits, table.schema.field("split").type)
    )
    return table, change


def add_labels(catalog_uri: str, tag: str, track_ids: Sequence[str], split: str = "train") -> LabelChange:
    """Label ``track_ids`` with ``tag`` in the catalog file, atomically and without losing concurrent edits.

    Read, change, then ``storage.replace_if_unchanged``: when another writer changed the catalog in
    between, read it again and redo the change. The tune and tag jobs read the new labels on their next
    run. Nothing is written when an id is unknown, the tag is unusable, or every track already has it.
    """
    fs, path = storage.filesystem(catalog_uri)
    if fs.isdir(path):
        raise NeighborsError(
            f"catalog {catalog_uri} is a folder: labels are written to one-file catalogs only"
        )
    for _ in range(20):
        body = storage.read_bytes(catalog_uri)
        table, change = with_label(pq.read_table(pa.BufferReader(body)), tag, track_ids, split)
        if not change.added and not change.split_set:
            return change
        sink = pa.BufferOutputStream()
        pq.write_table(catalog.conform(table), sink, compression="zstd")
        if storage.replace_if_unchanged(catalog_uri, body, sink.getvalue().to_pybytes()):
            return change
    raise storage.StorageError(f"catalog {catalog_uri} kept changing while labels were added; try again")
