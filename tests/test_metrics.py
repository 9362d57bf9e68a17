"""Metrics against scikit-learn and against float64 references written from the definitions."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, precision_recall_fscore_support, roc_auc_score

from musiclib.probe import metrics


def _auc_reference(y: np.ndarray, s: np.ndarray) -> float:
    """P(s_pos > s_neg) + 0.5 P(s_pos == s_neg), over every positive/negative pair, in float64."""
    pos, neg = s[y].astype(np.float64), s[~y].astype(np.float64)
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def _ap_reference(y: np.ndarray, s: np.ndarray) -> float:
    """Mean over positives of the precision at that positive's rank (distinct scores)."""
    order = np.argsort(-s.astype(np.float64))
    hits = y[order]
    precision_at = np.cumsum(hits) / np.arange(1, len(y) + 1)
    return float(precision_at[hits].mean())


@pytest.mark.parametrize("seed", range(5))
def test_against_sklearn_and_definition(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(200) < 0.2
    s = rng.normal(size=200) + y
    assert metrics.roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert metrics.roc_auc(y, s) == pytest.approx(_auc_reference(y, s), abs=1e-12)
    assert metrics.average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert metrics.average_precision(y, s) == pytest.approx(_ap_reference(y, s), abs=1e-12)


def test_ties_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.3
    s = np.round(rng.normal(size=300) + y, 1)  # many ties
    assert metrics.roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert metrics.roc_auc(y, s) == pytest.approx(_auc_reference(y, s), abs=1e-12)
    assert metrics.average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_evaluate_skips_and_lists_undefined_tags():
    rng = np.random.default_rng(1)
    y = rng.random((100, 4)) < 0.3
    y[:, 1] = False  # no positive on the test split
    y[:, 2] = True  # no negative
    s = rng.normal(size=(100, 4))
    result = metrics.evaluate(y, s, ["a", "b", "c", "d"])
    assert result.skipped == ["b", "c"]
    assert np.isnan(result.ap[1]) and np.isnan(result.roc_auc[2])
    macro = result.macro()
    assert macro["n_tags"] == 2
    expected = np.mean([average_precision_score(y[:, j], s[:, j]) for j in (0, 3)])
    assert macro["ap"] == pytest.approx(expected)
    assert result.macro(["a"])["roc_auc"] == pytest.approx(roc_auc_score(y[:, 0], s[:, 0]))
    assert result.macro(["b"])["n_tags"] == 0


def test_threshold_reaches_target_precision_with_most_recall():
    rng = np.random.default_rng(2)
    y = rng.random(400) < 0.3
    s = rng.normal(size=400) + 1.5 * y
    t = metrics.choose_threshold(y, s, target_precision=0.8)
    pred = s >= t
    precision = (pred & y).sum() / pred.sum()
    assert precision >= 0.8
    lower = s[s < t].max()  # the next threshold down would miss the target
    pred_lower = s >= lower
    assert (pred_lower & y).sum() / pred_lower.sum() < 0.8


def test_threshold_max_f1_matches_brute_force():
    rng = np.random.default_rng(3)
    y = rng.random(300) < 0.25
    s = rng.normal(size=300) + y
    t = metrics.choose_threshold(y, s)
    f1 = {
        c: precision_recall_fscore_support(y, s >= c, average="binary", zero_division=0)[2]
        for c in np.unique(s)
    }
    assert f1[t] == pytest.approx(max(f1.values()))
    assert metrics.choose_threshold(np.zeros(10, bool), s[:10]) is None
