"""SemiSupCon against a float64 reference written straight from the formula, on random inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from musiclib.train.losses import semisupcon_anchor_losses, semisupcon_loss, target_matrix


def reference_loss(
    z: np.ndarray, clips: list[int], tags: list[set[str]], tau: float, threshold: int, weighted: bool
):
    """The issue's formula with loops: P from tag sets, s_ij = cos / tau, mean over anchors."""
    n = len(z)
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)

    def p(i: int, j: int) -> float:
        same = 1.0 if clips[i] == clips[j] else 0.0
        a, b = tags[i], tags[j]
        if not a or not b:
            return same
        if weighted:
            return min(1.0, same + 2 * len(a & b) / (len(a) + len(b)))
        return min(1.0, same + (1.0 if len(a & b) >= threshold else 0.0))

    total = 0.0
    for i in range(n):
        s = [float(zn[i] @ zn[j]) / tau for j in range(n)]
        denom = sum(math.exp(s[k]) for k in range(n) if k != i)
        num = sum(p(i, j) * -math.log(math.exp(s[j]) / denom) for j in range(n) if j != i)
        total += num / max(sum(p(i, j) for j in range(n) if j != i), 1.0)
    return total / n


def reference_ntxent(z: np.ndarray, tau: float) -> float:
    """SimCLR's NT-Xent for 2B views ordered [first views, second views]."""
    n = len(z)
    b = n // 2
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    sim = zn @ zn.T / tau
    total = 0.0
    for i in range(n):
        pos = (i + b) % n
        total += -sim[i, pos] + math.log(sum(math.exp(sim[i, k]) for k in range(n) if k != i))
    return total / n


def random_batch(rng: np.random.Generator, n_clips: int, vocab: list[str], labeled: float):
    """Two views per clip (ordered [first views, second views]); a fraction of clips carry random tags."""
    tag_sets = []
    for _ in range(n_clips):
        if rng.random() < labeled:
            k = int(rng.integers(1, 4))
            tag_sets.append(set(rng.choice(vocab, size=k, replace=False).tolist()))
        else:
            tag_sets.append(set())
    clips = list(range(n_clips)) * 2
    view_tags = tag_sets * 2
    multi_hot = torch.tensor(
        [[1.0 if t in s else 0.0 for t in vocab] for s in view_tags], dtype=torch.float64
    )
    z = rng.standard_normal((2 * n_clips, 16))
    return z, clips, view_tags, multi_hot


@pytest.mark.parametrize("weighted,threshold", [(False, 1), (False, 2), (True, 1)])
@pytest.mark.parametrize("labeled", [0.0, 0.6, 1.0])
def test_loss_matches_formula(weighted: bool, threshold: int, labeled: float):
    rng = np.random.default_rng(int(labeled * 10) + threshold + 7 * weighted)
    vocab = ["rock", "jazz", "calm", "piano", "vocal"]
    for tau in (0.1, 0.5):
        z, clips, view_tags, multi_hot = random_batch(rng, 6, vocab, labeled)
        got = semisupcon_loss(torch.tensor(z), torch.tensor(clips), multi_hot, tau, threshold, weighted)
        want = reference_loss(z, clips, view_tags, tau, threshold, weighted)
        assert got.dtype == torch.float64
        assert abs(got.item() - want) < 1e-10


def test_no_labels_is_ntxent():
    rng = np.random.default_rng(3)
    z = rng.standard_normal((10, 8))
    got = semisupcon_loss(torch.tensor(z), torch.arange(5).repeat(2), torch.zeros(10, 4), tau=0.1)
    assert abs(got.item() - reference_ntxent(z, 0.1)) < 1e-10


def test_gradcheck():
    rng = np.random.default_rng(4)
    _, clips, _, multi_hot = random_batch(rng, 4, ["a", "b", "c"], 0.7)
    z = torch.tensor(rng.standard_normal((8, 5)), requires_grad=True)
    for weighted in (False, True):
        targets = target_matrix(torch.tensor(clips), multi_hot, 1, weighted)
        assert torch.autograd.gradcheck(lambda x, t=targets: semisupcon_anchor_losses(x, t, 0.2).mean(), (z,))


def test_stable_at_small_temperature():
    z = torch.randn(8, 4, dtype=torch.float32) * 100
    loss = semisupcon_loss(z, torch.arange(4).repeat(2), torch.zeros(8, 2), tau=1e-3)
    assert torch.isfinite(loss)


def test_anchor_subset_is_rows_of_full():
    rng = np.random.default_rng(5)
    z, clips, _, multi_hot = random_batch(rng, 5, ["a", "b", "c", "d"], 0.5)
    targets = target_matrix(torch.tensor(clips), multi_hot)
    full = semisupcon_anchor_losses(torch.tensor(z), targets)
    rows = torch.tensor([1, 4, 7])
    torch.testing.assert_close(semisupcon_anchor_losses(torch.tensor(z), targets, anchors=rows), full[rows])


def test_target_matrix_hand_built():
    # clips: 0 {rock, calm}, 1 {rock}, 2 unlabeled, 3 {jazz}; one view each plus a second view of clip 0
    vocab = ["rock", "calm", "jazz"]
    sets = [{"rock", "calm"}, {"rock"}, set(), {"jazz"}, {"rock", "calm"}]
    clips = torch.tensor([0, 1, 2, 3, 0])
    labels = torch.tensor([[1.0 if t in s else 0.0 for t in vocab] for s in sets])
    threshold_1 = target_matrix(clips, labels, threshold=1)
    expected_1 = torch.tensor(
        [
            [0, 1, 0, 0, 1],
            [1, 0, 0, 0, 1],
            [0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(threshold_1, expected_1)
    threshold_2 = target_matrix(clips, labels, threshold=2)
    expected_2 = torch.zeros(5, 5, dtype=torch.float64)
    expected_2[0, 4] = expected_2[4, 0] = 1.0  # same clip; {rock} shares only one tag with {rock, calm}
    torch.testing.assert_close(threshold_2, expected_2)
    dice = target_matrix(clips, labels, weighted=True)
    assert dice[0, 1].item() == pytest.approx(2 * 1 / 3)  # {rock, calm} vs {rock}
    assert dice[0, 4].item() == 1.0  # same clip, capped at 1
    assert dice[1, 3].item() == 0.0 and dice[2].sum().item() == 0.0
    assert torch.all(torch.diagonal(dice) == 0)
