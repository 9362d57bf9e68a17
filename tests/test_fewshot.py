"""Support-set sampler: k positives per tag when the pool has them, seeded, co-occurring tags counted once."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from musiclib.datasets import tagged_embeddings
from musiclib.probe import fewshot, metrics, probes


def _pool(seed: int = 0, n: int = 200, n_tags: int = 8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y = rng.random((n, n_tags)) < np.linspace(0.4, 0.02, n_tags)
    y[:3, -1] = True  # the rarest tag has exactly a few positives
    return y


@pytest.mark.parametrize("k", [1, 2, 5, 10])
def test_at_least_k_positives_per_tag_when_the_pool_has_them(k):
    y = _pool()
    idx = fewshot.sample_support(y, k, seed=3)
    counts = y[idx].sum(axis=0)
    assert (counts >= np.minimum(k, y.sum(axis=0))).all()
    assert len(np.unique(idx)) == len(idx)


def test_cooccurring_tags_do_not_waste_labels():
    y = np.zeros((50, 2), dtype=bool)
    y[:20] = True  # every positive of tag 0 is also a positive of tag 1
    idx = fewshot.sample_support(y, 5, seed=0)
    assert len(idx) == 5


def test_deterministic_per_seed_and_different_across_seeds():
    y = _pool()
    a, b = fewshot.sample_support(y, 2, seed=7), fewshot.sample_support(y, 2, seed=7)
    np.testing.assert_array_equal(a, b)
    sets = fewshot.support_sets(y, 2, repetitions=5, seed=0)
    assert len(sets) == 5 and len({tuple(s) for s in sets}) > 1


def test_budget_all_uses_everything():
    y = _pool()
    np.testing.assert_array_equal(fewshot.sample_support(y, None, seed=0), np.arange(len(y)))
    assert len(fewshot.support_sets(y, None, repetitions=5, seed=0)) == 1


def test_parse_budget():
    assert fewshot.parse_budget("all") is None and fewshot.parse_budget("5") == 5
    for bad in ("0", "-1", "five"):
        with pytest.raises(ValueError, match="budget"):
            fewshot.parse_budget(bad)


def test_prepare_keeps_labeled_tracks_and_records_embedding_errors():
    cat, emb = tagged_embeddings.make(n_tracks=120, n_errors=4, seed=1)
    data = fewshot.prepare(cat, emb, "m")
    labeled = {
        t for t, tags in zip(cat["track_id"].to_pylist(), cat["tags"].to_pylist(), strict=True) if tags
    }
    used = set().union(*(set(ids) for ids in data.track_ids.values()))
    assert used <= labeled
    errored = set(emb.filter(emb["error"].is_valid())["track_id"].to_pylist())
    assert errored <= set(data.excluded) and not used & errored
    assert all(data.x[s].shape == (len(data.track_ids[s]), 32) for s in data.x)
    assert set(data.head) | set(data.tail) == set(data.tags)


def test_run_config_scores_the_validation_and_the_test_split():
    """Each row holds the probe's metrics on valid (what choices use) and on test (what is reported)."""
    cat, emb = tagged_embeddings.make(n_tracks=200, n_tags=6, dim=16, noise=3.0, seed=2)
    data = fewshot.prepare(cat, emb, "m")
    config = {"budget": "5", "probe": "logreg", "norm": "standardize", "C": 1.0}
    rows = pd.DataFrame(fewshot.run_config(data, config, repetitions=2, seed=0))
    assert len(rows) == 2 * len(data.tags)
    for rep, support in enumerate(fewshot.support_sets(data.y["train"], 5, repetitions=2, seed=0)):
        probe = probes.fit(
            "logreg", data.x["train"][support], data.y["train"][support], data.tags, "standardize", {"C": 1.0}
        )
        got = rows[rows["rep"] == rep].set_index("tag").loc[data.tags]
        for split in fewshot.EVAL_SPLITS:
            expected = metrics.evaluate(data.y[split], probe.apply(data.x[split]), data.tags)
            np.testing.assert_allclose(got[f"{split}_ap"], expected.ap, rtol=1e-12)
            np.testing.assert_allclose(got[f"{split}_roc_auc"], expected.roc_auc, rtol=1e-12)
            np.testing.assert_array_equal(got[f"n_{split}_pos"], data.y[split].sum(axis=0))
        assert not np.allclose(got["valid_ap"], got["test_ap"], equal_nan=True)
