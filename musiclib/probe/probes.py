"""Few-shot linear probes on frozen embeddings, one-vs-rest over all tags, and the saved probe set.

Three probes (Ma & Lerch 2024), each ending as one linear map ``z @ W + b`` on normalised embeddings:
- ``logreg``: scikit-learn logistic regression per tag (C, class weighting); scores are probabilities.
- ``linear``: one torch linear layer for all tags at once, trained with BCE (lr, weight decay, epochs).
- ``centroid``: the class-centroid (prototype) baseline; scores are cosine similarities to each tag's
  mean positive embedding.
Normalisation (``none``, ``l2``, ``standardize``) is fitted on the support set only; on vectors made of
parts side by side (the ``fused`` representation: the learned embedding and the log-mel statistics) each
part is standardised and weighted to carry the same total variance (``fit_normalizer``). A
:class:`ProbeSet` holds plain arrays and saves to safetensors, so loading one never unpickles anything,
and ``apply`` is one matrix product for all tags. torch and scikit-learn are imported by the fits that
use them, so
applying a saved probe set (the tag job's tasks) loads neither.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save
from scipy.special import expit

from musiclib.core import storage

if TYPE_CHECKING:
    import torch

PROBES = ("logreg", "linear", "centroid")
NORMS = ("none", "l2", "standardize")
_EPS = 1e-8


@dataclass
class Normalizer:
    """``z = post_l2(((pre_l2(x)) - mean) / scale)``: covers none, L2, standardisation and the cosine step."""

    mean: np.ndarray
    scale: np.ndarray
    pre_l2: bool = False
    post_l2: bool = False

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if self.pre_l2:
            x = _l2(x)
        x = (x - self.mean) / self.scale
        return _l2(x) if self.post_l2 else x


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _EPS)


def fit_normalizer(kind: str, x: np.ndarray, cosine: bool = False, parts: Sequence[int] = ()) -> Normalizer:
    """Fit a normaliser on the support set; ``cosine`` adds a final L2 step (the centroid probe's scores).

    ``parts`` are the sizes of the parts ``x`` holds side by side (the ``fused`` representation; empty:
    one part). Each dimension is standardised, then each part is scaled to the same total variance (a
    1,024-d embedding does not drown 128 statistics), the whole keeping the total of plain
    standardisation (one per dimension), so probe learning rates tuned for standardised inputs still fit.
    Folded into ``scale``: a probe set still applies as one normalise and one product.
    """
    if kind not in NORMS:
        raise ValueError(f"unknown normalisation {kind!r}; expected one of {NORMS}")
    if parts and (kind != "standardize" or sum(parts) != x.shape[1]):
        raise ValueError(
            f"parts {list(parts)} need the standardize normalisation and {x.shape[1]} dimensions"
        )
    dim = x.shape[1]
    mean, scale = np.zeros(dim, np.float32), np.ones(dim, np.float32)
    if kind == "standardize":
        mean = x.mean(axis=0).astype(np.float32)
        scale = np.maximum(x.std(axis=0), 1e-6).astype(np.float32)
    if parts:
        share = np.asarray(parts, np.float64) * len(parts) / dim  # each part's size over its equal share
        scale = scale * np.repeat(np.sqrt(share), parts).astype(np.float32)
    return Normalizer(mean, scale, pre_l2=kind == "l2", post_l2=cosine)


# --------------------------------------------------------------------------- fitting


def fit_logreg(
    z: np.ndarray, y: np.ndarray, c: float = 1.0, class_weight: str | None = "balanced"
) -> tuple[np.ndarray, np.ndarray]:
    """Per-tag scikit-learn logistic regression; a tag with one class in the support set scores constant.

    Returns ``(W [dim, n_tags], b [n_tags])`` in logit space.
    """
    from sklearn.linear_model import LogisticRegression

    dim, n_tags = z.shape[1], y.shape[1]
    w = np.zeros((dim, n_tags), np.float32)
    b = np.zeros(n_tags, np.float32)
    for j in range(n_tags):
        n_pos = int(y[:, j].sum())
        if n_pos in (0, len(y)):
            b[j] = -10.0 if n_pos == 0 else 10.0
            continue
        model = LogisticRegression(C=c, class_weight=class_weight, max_iter=500)
        model.fit(z, y[:, j])
        w[:, j] = model.coef_[0]
        b[j] = model.intercept_[0]
    return w, b


def fit_linear(
    z: np.ndarray,
    y: np.ndarray,
    lr: float = 0.05,
    weight_decay: float = 1e-4,
    epochs: int = 50,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """One linear layer for all tags, full-batch Adam on BCE with per-tag positive weights.

    Positive weights (negatives / positives per tag) play the role of scikit-learn's balanced class weights,
    so rare tags are not drowned by their negatives. Returns ``(W [dim, n_tags], b [n_tags])``.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    x_t = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32))
    y_t = torch.from_numpy(y.astype(np.float32))
    n_pos = y_t.sum(0)
    pos_weight = ((len(y_t) - n_pos) / n_pos.clamp(min=1)).clamp(min=1e-3)
    # drawn as a [tags, dim] layer weight, so a seed gives the same start as torch.nn.Linear would
    w = (torch.randn((y.shape[1], z.shape[1]), generator=gen) * 0.01).T.contiguous().requires_grad_()
    b = torch.zeros(y.shape[1], requires_grad=True)
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in (w, b)]
    for step in range(1, epochs + 1):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x_t @ w + b, y_t, pos_weight=pos_weight)
        grads = torch.autograd.grad(loss, (w, b))
        with torch.no_grad():
            for p, g, (m, v) in zip((w, b), grads, moments, strict=True):
                adam_step(p, g, m, v, step, lr, weight_decay)
    return w.detach().numpy().copy(), b.detach().numpy().copy()


def adam_step(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    step: int,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> None:
    """One in-place Adam update (Kingma & Ba; weight decay as L2 on the gradient, as ``torch.optim.Adam``).

    Written out because ``torch.optim`` imports the whole ``torch._dynamo`` compiler stack on first use,
    in every fresh Tune worker, for a fit that takes far less (``bench/bench_tune.py startup``; measured in
    docs/BENCHMARKS.md, "tune").
    """
    g = g + weight_decay * p
    m.mul_(betas[0]).add_(g, alpha=1 - betas[0])
    v.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
    m_hat = m / (1 - betas[0] ** step)
    v_hat = v / (1 - betas[1] ** step)
    p.sub_(lr * m_hat / (v_hat.sqrt() + eps))


def fit_centroid(z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm mean of each tag's (already L2-normalised) positives; a tag without positives scores 0."""
    counts = y.sum(axis=0).astype(np.float32)
    sums = z.T.astype(np.float32) @ y.astype(np.float32)
    centroids = sums / np.maximum(counts, 1.0)
    w = centroids / np.maximum(np.linalg.norm(centroids, axis=0, keepdims=True), _EPS)
    return w.astype(np.float32), np.zeros(y.shape[1], np.float32)


@dataclass
class ProbeSet:
    """A fitted probe for every tag as plain arrays: normalisation, ``W``, ``b``, thresholds, tags, model id.

    ``link`` is ``sigmoid`` (logreg, linear: scores are probabilities) or ``identity`` (centroid: cosine).
    ``config`` records the fit, the representation it reads included (``representation``).
    """

    tags: list[str]
    weights: np.ndarray  # [dim, n_tags]
    biases: np.ndarray  # [n_tags]
    norm: Normalizer
    link: str = "sigmoid"
    thresholds: np.ndarray | None = None  # [n_tags]; score >= threshold predicts the tag
    model_id: str = ""
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def representation(self) -> str:
        """What the probes read (``embeddings_table.REPRESENTATIONS``); probe sets saved before there was
        a choice read the learned embedding."""
        return self.config.get("representation", "embedding")

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Scores ``[n_tracks, n_tags]``: normalise, then one matrix product for all tags, then the link."""
        logits = self.norm(x) @ self.weights + self.biases
        return expit(logits) if self.link == "sigmoid" else logits  # expit: no overflow at large |logit|

    def predict(self, scores: np.ndarray) -> np.ndarray:
        """Boolean ``[n_tracks, n_tags]``: scores at or above each tag's saved threshold."""
        if self.thresholds is None:
            raise ValueError("this probe set has no thresholds: choose them on the validation split first")
        return scores >= self.thresholds

    def save(self, uri: str) -> None:
        """Write safetensors: arrays as tensors, tags / link / model id / config as JSON metadata strings."""
        arrays = {
            "weights": np.ascontiguousarray(self.weights, np.float32),
            "biases": np.ascontiguousarray(self.biases, np.float32),
            "norm_mean": np.ascontiguousarray(self.norm.mean, np.float32),
            "norm_scale": np.ascontiguousarray(self.norm.scale, np.float32),
            "thresholds": np.ascontiguousarray(
                self.thresholds if self.thresholds is not None else np.full(len(self.tags), np.nan),
                np.float32,
            ),
        }
        meta = {
            "tags": json.dumps(self.tags),
            "link": self.link,
            "pre_l2": json.dumps(self.norm.pre_l2),
            "post_l2": json.dumps(self.norm.post_l2),
            "model_id": self.model_id,
            "config": json.dumps(self.config, sort_keys=True, default=str),
        }
        storage.write_bytes(uri, st_save(arrays, metadata=meta))

    @classmethod
    def load(cls, uri: str) -> ProbeSet:
        """Read a saved probe set (safetensors only; nothing is unpickled)."""
        data = storage.read_bytes(uri)
        arrays = st_load(data)
        meta = _safetensors_metadata(data)
        thresholds = arrays["thresholds"]
        return cls(
            tags=json.loads(meta["tags"]),
            weights=arrays["weights"],
            biases=arrays["biases"],
            norm=Normalizer(
                arrays["norm_mean"],
                arrays["norm_scale"],
                pre_l2=json.loads(meta["pre_l2"]),
                post_l2=json.loads(meta["post_l2"]),
            ),
            link=meta["link"],
            thresholds=None if np.isnan(thresholds).all() else thresholds,
            model_id=meta["model_id"],
            config=json.loads(meta["config"]),
        )


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The JSON header's ``__metadata__`` of a safetensors blob (8-byte little-endian length, then JSON)."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]).get("__metadata__", {})


def fit(
    probe: str,
    x: np.ndarray,
    y: np.ndarray,
    tags: Sequence[str],
    norm: str = "none",
    params: dict[str, Any] | None = None,
    seed: int = 0,
    model_id: str = "",
    representation: str = "embedding",
    parts: Sequence[int] = (),
) -> ProbeSet:
    """Fit one probe type for all tags on a support set ``x [n, dim]``, ``y [n, n_tags]`` (bool).

    ``x`` is the ``representation`` of the tracks, made of ``parts`` side by side (``fit_normalizer``).
    """
    params = dict(params or {})
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; expected one of {PROBES}")
    normalizer = fit_normalizer(norm, x, cosine=probe == "centroid", parts=parts)
    z = normalizer(x)
    if probe == "logreg":
        w, b = fit_logreg(
            z, y, c=float(params.get("C", 1.0)), class_weight=params.get("class_weight", "balanced")
        )
    elif probe == "linear":
        w, b = fit_linear(
            z,
            y,
            lr=float(params.get("lr", 0.05)),
            weight_decay=float(params.get("weight_decay", 1e-4)),
            epochs=int(params.get("epochs", 50)),
            seed=seed,
        )
    else:
        w, b = fit_centroid(z, y)
    config = {"probe": probe, "representation": representation, "norm": norm, **params}
    link = "identity" if probe == "centroid" else "sigmoid"
    return ProbeSet(list(tags), w, b, normalizer, link=link, model_id=model_id, config=config)
