"""Unit vectors drawn from a mixture of clusters: stand-ins for a catalog's embeddings (nearest-neighbour
tests and benchmarks).

Independent Gaussian vectors are unrealistic for nearest-neighbour search (in 512 dimensions every pair is
about equally far apart, so no index beats a scan). Embeddings of music gather by style: here a two-level
mixture, ``n_clusters`` styles of ``sub_clusters`` sub-styles each, with Zipf-like style sizes; the noise
is as large as the sub-style offsets, so sub-styles overlap and neighbours cross cell boundaries.
"""

from __future__ import annotations

import numpy as np


def make(
    n: int,
    dim: int = 512,
    n_clusters: int = 100,
    sub_clusters: int = 100,
    spread: float = 1.0,
    seed: int = 0,
    block: int = 65536,
) -> np.ndarray:
    """``[n, dim]`` float32 unit rows: style centre + sub-style offset (norm 0.5) + noise (norm ``spread``).

    Style sizes fall off like ``1 / rank**0.5``. Rows are generated ``block`` at a time, so 1 M x 512
    needs little more than the 2 GB of the result. The same arguments give the same vectors.
    """
    rng = np.random.default_rng(seed)
    styles = _unit(rng.standard_normal((n_clusters, dim), dtype=np.float32))
    offsets = 0.5 * _unit(rng.standard_normal((n_clusters * sub_clusters, dim), dtype=np.float32))
    centres = np.repeat(styles, sub_clusters, axis=0) + offsets
    weights = np.repeat(1.0 / np.arange(1, n_clusters + 1) ** 0.5, sub_clusters)
    weights /= weights.sum()
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, block):
        stop = min(n, start + block)
        which = rng.choice(len(centres), size=stop - start, p=weights)
        noise = rng.standard_normal((stop - start, dim), dtype=np.float32) * (spread / np.sqrt(dim))
        out[start:stop] = _unit(centres[which] + noise)
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)
