"""SemiSupCon against a float64 reference written straight from the formula, on random inputs, with and
without a queue of past projections."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from musiclib.train.losses import pair_targets, semisupcon_anchor_losses, semisupcon_loss, target_matrix


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


def reference_with_queue(
    z: np.ndarray,
    ids: list[int],
    tracks: list[int],
    tags: list[set[str]],
    queue: np.ndarray,
    queue_tracks: list[int],
    queue_tags: list[set[str]],
    tau: float,
    threshold: int,
) -> list[float]:
    """l_i over the batch (j != i) and the queue, from the definition, in float64 loops: a batch view is a
    positive when it is the same clip, a queue entry when it is the same track, either when two labeled
    clips share ``threshold`` tags."""

    def unit(v: np.ndarray) -> np.ndarray:
        return v / np.linalg.norm(v)

    def target(same: bool, a: set[str], b: set[str]) -> float:
        shares = bool(a) and bool(b) and len(a & b) >= threshold
        return 1.0 if same or shares else 0.0

    losses = []
    for i in range(len(z)):
        candidates = [
            (unit(z[j]), target(ids[i] == ids[j], tags[i], tags[j])) for j in range(len(z)) if j != i
        ]
        candidates += [
            (unit(q), target(tracks[i] == t, tags[i], g)) for q, t, g in zip(queue, queue_tracks, queue_tags)
        ]
        s = [float(unit(z[i]) @ v) / tau for v, _ in candidates]
        denom = sum(math.exp(x) for x in s)
        num = sum(p * -math.log(math.exp(x) / denom) for x, (_, p) in zip(s, candidates))
        losses.append(num / max(sum(p for _, p in candidates), 1.0))
    return losses


def test_the_queue_adds_its_entries_as_candidates_with_track_and_label_targets():
    """With a queue, each anchor's loss equals the reference that takes the same negatives and positives:
    the batch's other views and the queue's past projections (a past view of the same track is positive)."""
    rng = np.random.default_rng(4)
    vocab = ["a", "b", "c", "d"]
    n_clips, q = 5, 7
    z, clips, tags, labels = random_batch(rng, n_clips, vocab, labeled=0.6)
    tracks = [10 + c for c in clips]  # clip c comes from track 10 + c
    queue = rng.normal(size=(q, z.shape[1]))
    queue_tracks = [10, 12, 99, 13, 98, 97, 10]  # three past views of batch tracks
    queue_tags = [
        set(rng.choice(vocab, size=int(rng.integers(0, 3)), replace=False).tolist()) for _ in range(q)
    ]
    queue_labels = torch.tensor([[t in g for t in vocab] for g in queue_tags], dtype=torch.float64)
    ids, t = torch.tensor(clips), torch.tensor(tracks)
    targets = target_matrix(ids, labels, threshold=1)
    queue_targets = pair_targets(t, labels, torch.tensor(queue_tracks), queue_labels, threshold=1)
    got = semisupcon_anchor_losses(
        torch.from_numpy(z), targets, 0.2, queue=torch.from_numpy(queue), queue_targets=queue_targets
    )
    expected = reference_with_queue(z, clips, tracks, tags, queue, queue_tracks, queue_tags, 0.2, 1)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)
    empty = semisupcon_anchor_losses(
        torch.from_numpy(z),
        targets,
        0.2,
        queue=torch.zeros(0, z.shape[1]),
        queue_targets=queue_targets[:, :0],
    )
    torch.testing.assert_close(empty, semisupcon_anchor_losses(torch.from_numpy(z), targets, 0.2))


def test_weighted_targets_weigh_each_tag():
    """Dice targets with tag weights: 2 * (weights of the shared tags) / (weights of each clip's tags), from the
    definition in float64, capped at 1 with the same-clip term; all weights 1 is plain Dice."""
    rng = np.random.default_rng(5)
    vocab = ["rock", "jazz", "calm", "piano", "vocal"]
    weight = dict(zip(vocab, rng.uniform(0.0, 3.0, len(vocab)), strict=True))
    _, clips, view_tags, multi_hot = random_batch(rng, 6, vocab, labeled=0.8)
    w = torch.tensor([weight[t] for t in vocab], dtype=torch.float64)
    got = target_matrix(torch.tensor(clips), multi_hot, weighted=True, tag_weights=w)
    for i, a in enumerate(view_tags):
        for j, b in enumerate(view_tags):
            label = (
                0.0
                if not a or not b
                else 2
                * sum(weight[t] for t in a & b)
                / (sum(weight[t] for t in a) + sum(weight[t] for t in b))
            )
            want = 0.0 if i == j else min(1.0, (clips[i] == clips[j]) + label)
            assert abs(float(got[i, j]) - want) < 1e-12
    plain = target_matrix(torch.tensor(clips), multi_hot, weighted=True)
    torch.testing.assert_close(
        target_matrix(torch.tensor(clips), multi_hot, weighted=True, tag_weights=w * 0 + 1), plain
    )
