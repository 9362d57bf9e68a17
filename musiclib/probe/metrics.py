"""Tag metrics: per-tag ROC-AUC and average precision, macro over tags, and write-back thresholds.

Definitions follow scikit-learn (tests check both against it and against a float64 reference from the
definition). Computed here rather than with ``roc_auc_score`` / ``average_precision_score`` /
``precision_recall_curve``: a sweep scores every tag of every repetition of every configuration, and
scikit-learn's input checks make each call many times slower on these small arrays (measured in
``docs/BENCHMARKS.md``, "Tag metrics"). A tag with no positive or no negative among the evaluated tracks has no ROC-AUC or AP: it is
skipped and listed, never counted as zero or one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import rankdata


def roc_auc(y: np.ndarray, s: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a random positive > a random negative), ties counting half."""
    y = np.asarray(y, dtype=bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(np.asarray(s, dtype=np.float64))
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _pr_curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and threshold at each distinct score, highest first (predict ``s >= t``)."""
    order = np.argsort(-np.asarray(s, dtype=np.float64), kind="mergesort")
    s_sorted = np.asarray(s, dtype=np.float64)[order]
    y_sorted = np.asarray(y, dtype=bool)[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s_sorted) - 1]
    tp = np.cumsum(y_sorted)[last_of_tie]
    fp = (last_of_tie + 1) - tp
    precision = tp / (tp + fp)
    recall = tp / max(int(y_sorted.sum()), 1)
    return precision, recall, s_sorted[last_of_tie]


def average_precision(y: np.ndarray, s: np.ndarray) -> float:
    """AP = sum over thresholds of (R_n - R_{n-1}) * P_n, as scikit-learn defines it (no interpolation)."""
    y = np.asarray(y, dtype=bool)
    if y.sum() == 0 or y.all():
        return float("nan")
    precision, recall, _ = _pr_curve(y, s)
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


@dataclass
class TagMetrics:
    """Per-tag ROC-AUC and AP over evaluated tags, and the tags skipped for lack of positives or negatives."""

    tags: list[str]
    roc_auc: np.ndarray
    ap: np.ndarray
    n_pos: np.ndarray
    skipped: list[str] = field(default_factory=list)

    def macro(self, subset: Sequence[str] | None = None) -> dict[str, float]:
        """Macro ROC-AUC and AP over evaluated tags (of ``subset`` when given); nan when none is evaluated."""
        keep = np.array([subset is None or t in set(subset) for t in self.tags], dtype=bool)
        keep &= ~np.isnan(self.ap)
        if not keep.any():
            return {"roc_auc": float("nan"), "ap": float("nan"), "n_tags": 0}
        return {
            "roc_auc": float(self.roc_auc[keep].mean()),
            "ap": float(self.ap[keep].mean()),
            "n_tags": int(keep.sum()),
        }


def evaluate(y: np.ndarray, scores: np.ndarray, tags: Sequence[str]) -> TagMetrics:
    """Per-tag metrics for ``[n_tracks, n_tags]`` labels and scores; undefined tags are nan and listed."""
    aucs = np.array([roc_auc(y[:, j], scores[:, j]) for j in range(len(tags))])
    aps = np.array([average_precision(y[:, j], scores[:, j]) for j in range(len(tags))])
    skipped = [t for t, a in zip(tags, aps, strict=True) if np.isnan(a)]
    return TagMetrics(list(tags), aucs, aps, y.sum(axis=0).astype(np.int64), skipped)


def choose_threshold(y: np.ndarray, s: np.ndarray, target_precision: float | None = None) -> float | None:
    """Score threshold (predict ``s >= t``) for one tag, or None when ``y`` has no positive.

    With a target precision: the lowest threshold that reaches it (the most recall at that precision);
    when no threshold reaches it, or with no target, the threshold of maximum F1.
    """
    y = np.asarray(y, dtype=bool)
    if y.sum() == 0:
        return None
    precision, recall, thresholds = _pr_curve(y, s)
    if target_precision is not None:
        ok = np.flatnonzero(precision >= target_precision)
        if len(ok):
            return float(thresholds[ok[-1]])
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return float(thresholds[int(np.argmax(f1))])
