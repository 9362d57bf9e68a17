"""The nearest-neighbour index over unit vectors and its file: exact search and faiss IVF behind one interface.

Two indexes answer ``search``, ``vectors`` and ``arrays`` (``to_bytes``/``from_bytes`` write and read them):

- ``ExactIndex``: every query against every vector, by blocked matrix products (``exact_search``); the
  reference, and the index of small catalogs (below ``EXACT_BELOW`` vectors, where a scan is fast enough).
- ``IVFIndex``: faiss's inverted file (IVF-Flat, inner product on unit vectors): k-means cells, each query
  scans the ``nprobe`` nearest cells. Chosen over HNSW (hnswlib, usearch) by ``bench/bench_ann.py``;
  numbers, recall and the threshold are in ``docs/BENCHMARKS.md``.

An index file is safetensors (plain arrays and string metadata; never pickle, never faiss's own
serialiser), checked for shapes, dtypes and a consistent cell layout before faiss sees it, so an index
read from a bucket cannot run code. Rows of an index are row numbers; ``musiclib.tag.neighbors`` pairs an
index with the track ids of its rows and answers queries.
"""

from __future__ import annotations

import json

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

FORMAT = "musiclib-neighbors/1"
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
