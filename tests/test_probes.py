"""Probes: separable embeddings give ROC-AUC near 1, shuffled labels near 0.5; the saved set round-trips."""

from __future__ import annotations

import numpy as np
import pytest

from musiclib.probe import metrics, probes

TAGS = [f"t{j}" for j in range(5)]


def _separable(seed: int = 0, n: int = 400, dim: int = 16) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.random((n, len(TAGS))) < 0.3
    prototypes = 3 * rng.normal(size=(len(TAGS), dim))
    x = y.astype(np.float64) @ prototypes + 0.3 * rng.normal(size=(n, dim)) + 5.0  # offset: norms matter
    return x.astype(np.float32), y


PARAMS = {"logreg": {"C": 1.0}, "linear": {"epochs": 150, "lr": 0.05}, "centroid": {}}


@pytest.mark.parametrize("probe", probes.PROBES)
@pytest.mark.parametrize("norm", probes.NORMS)
def test_separable_embeddings_reach_auc_near_one(probe, norm):
    x, y = _separable()
    fitted = probes.fit(probe, x[:200], y[:200], TAGS, norm=norm, params=PARAMS[probe])
    macro = metrics.evaluate(y[200:], fitted.apply(x[200:]), TAGS).macro()
    assert macro["roc_auc"] > 0.97


@pytest.mark.parametrize("probe", probes.PROBES)
def test_shuffled_labels_give_chance(probe):
    x, y = _separable(seed=1, n=2000)
    y_shuffled = np.random.default_rng(0).permutation(y)
    fitted = probes.fit(probe, x[:1000], y_shuffled[:1000], TAGS, norm="standardize", params=PARAMS[probe])
    macro = metrics.evaluate(y_shuffled[1000:], fitted.apply(x[1000:]), TAGS).macro()
    assert abs(macro["roc_auc"] - 0.5) < 0.05


def test_normalisation_is_fitted_on_the_support_set_only():
    x, _ = _separable()
    norm = probes.fit_normalizer("standardize", x[:50])
    np.testing.assert_allclose(norm.mean, x[:50].mean(axis=0), rtol=1e-5)
    z = probes.fit_normalizer("l2", x)(x)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)


def test_single_class_tag_gets_constant_scores():
    x, y = _separable()
    y[:, 0] = False
    fitted = probes.fit("logreg", x, y, TAGS)
    scores = fitted.apply(x)
    assert np.ptp(scores[:, 0]) == 0 and (scores[:, 0] < 0.01).all()


@pytest.mark.parametrize("probe", probes.PROBES)
def test_saved_probe_set_round_trips_without_pickle(tmp_path, probe):
    x, y = _separable()
    fitted = probes.fit(probe, x, y, TAGS, norm="standardize", params=PARAMS[probe], model_id="m1")
    fitted.thresholds = np.linspace(0.1, 0.5, len(TAGS)).astype(np.float32)
    uri = str(tmp_path / "probe_set.safetensors")
    fitted.save(uri)
    loaded = probes.ProbeSet.load(uri)
    assert loaded.tags == TAGS and loaded.model_id == "m1" and loaded.link == fitted.link
    assert loaded.config["probe"] == probe
    np.testing.assert_allclose(loaded.apply(x), fitted.apply(x), rtol=1e-6)
    np.testing.assert_array_equal(loaded.predict(loaded.apply(x)), loaded.apply(x) >= fitted.thresholds)


def test_apply_is_one_linear_map_on_normalised_embeddings():
    x, y = _separable()
    fitted = probes.fit("centroid", x, y, TAGS, norm="l2")
    z = fitted.norm(x)
    np.testing.assert_allclose(fitted.apply(x), z @ fitted.weights + fitted.biases, rtol=1e-6)
    cos = (
        (z @ fitted.weights)
        / np.linalg.norm(z, axis=1, keepdims=True)
        / np.linalg.norm(fitted.weights, axis=0)
    )
    np.testing.assert_allclose(fitted.apply(x), cos, atol=1e-5)


def test_linear_probe_matches_torch_adam():
    """The written-out Adam follows ``torch.optim.Adam`` (L2 weight decay) step for step."""
    import torch

    x, y = _separable(seed=3, n=120)
    w, b = probes.fit_linear(x, y, lr=0.05, weight_decay=1e-3, epochs=30, seed=7)

    layer = torch.nn.Linear(x.shape[1], y.shape[1])
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=torch.Generator().manual_seed(7)) * 0.01)
        layer.bias.zero_()
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y.astype(np.float32))
    n_pos = y_t.sum(0)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=((len(y_t) - n_pos) / n_pos.clamp(min=1)).clamp(min=1e-3))
    opt = torch.optim.Adam(layer.parameters(), lr=0.05, weight_decay=1e-3)
    for _ in range(30):
        opt.zero_grad()
        loss_fn(layer(x_t), y_t).backward()
        opt.step()
    np.testing.assert_allclose(w, layer.weight.detach().numpy().T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b, layer.bias.detach().numpy(), rtol=1e-4, atol=1e-5)


def test_sigmoid_scores_match_the_formula_without_overflow(recwarn):
    """Large logits of either sign (confident probes) give 0 or 1, not an overflow warning."""
    x, y = _separable()
    fitted = probes.fit("logreg", x, y, TAGS, norm="standardize")
    fitted.weights = fitted.weights * 1e4  # logits far beyond exp's range in float32 and float64
    scores = fitted.apply(x)
    logits = (fitted.norm(x) @ fitted.weights + fitted.biases).astype(np.float64)
    with np.errstate(over="ignore"):
        reference = 1.0 / (1.0 + np.exp(-logits))
    np.testing.assert_allclose(scores, reference, atol=1e-12)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_fused_normalisation_equals_its_definition_in_float64():
    """Each dimension standardised on the support set, each part then scaled by the square root of its
    equal share of the dimensions over its size: the two parts carry equal total variance, however
    unequal their sizes and scales, and the whole that of plain standardisation."""
    rng = np.random.default_rng(3)
    learned = 40.0 * rng.normal(size=(60, 48)) + 7.0  # a wide part of large values
    stats = 0.1 * rng.normal(size=(60, 6)) - 5.0  # a narrow part of small spread
    x = np.hstack([learned, stats]).astype(np.float32).astype(np.float64)  # the float32 inputs, exactly
    learned, stats = x[:, :48], x[:, 48:]
    norm = probes.fit_normalizer("standardize", x.astype(np.float32), parts=[48, 6])
    reference = np.hstack(
        [(p - p.mean(axis=0)) / p.std(axis=0) * np.sqrt(54 / 2 / p.shape[1]) for p in (learned, stats)]
    )
    z = norm(x.astype(np.float32))
    np.testing.assert_allclose(z, reference, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        [z[:, :48].var(axis=0).sum(), z[:, 48:].var(axis=0).sum()], [27.0, 27.0], rtol=1e-4
    )
    assert not (norm.pre_l2 or norm.post_l2)  # folded into mean and scale: one normalise, one product
    with pytest.raises(ValueError, match="need the standardize normalisation"):
        probes.fit_normalizer("l2", x, parts=[48, 6])
    with pytest.raises(ValueError, match="need the standardize normalisation and 54 dimensions"):
        probes.fit_normalizer("standardize", x, parts=[48, 5])


@pytest.mark.parametrize("probe", probes.PROBES)
def test_a_fused_probe_set_round_trips_with_its_representation(tmp_path, probe):
    """The representation is in the saved config; applying the loaded set is the normalisation and the
    product by hand, in float64; a set saved without one reads the learned embedding."""
    x, y = _separable(dim=20)
    fitted = probes.fit(
        probe, x, y, TAGS, norm="standardize", params=PARAMS[probe], representation="fused", parts=[16, 4]
    )
    fitted.save(str(tmp_path / "fused.safetensors"))
    loaded = probes.ProbeSet.load(str(tmp_path / "fused.safetensors"))
    assert loaded.representation == "fused" and loaded.config["representation"] == "fused"
    z = (x.astype(np.float64) - loaded.norm.mean) / loaded.norm.scale
    if loaded.norm.post_l2:
        z /= np.linalg.norm(z, axis=1, keepdims=True)
    logits = z @ loaded.weights.astype(np.float64) + loaded.biases
    expected = 1 / (1 + np.exp(-logits)) if loaded.link == "sigmoid" else logits
    np.testing.assert_allclose(loaded.apply(x), expected, rtol=1e-4, atol=1e-5)
    assert probes.ProbeSet([], np.zeros((1, 0)), np.zeros(0), loaded.norm).representation == "embedding"
