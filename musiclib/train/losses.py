"""SemiSupCon: the semi-supervised contrastive loss (Guinot, Quinton, Fazekas, ISMIR 2024) and its targets.

Let z be the projections of all views in a batch, s_ij = cos(z_i, z_j) / tau and P the target matrix with a
zero diagonal. For each anchor i

    l_i = [ sum_{j != i} P_ij * -log( exp(s_ij) / sum_{k != i} exp(s_ik) ) ] / max(sum_{j != i} P_ij, 1)

and the loss is the mean of l_i over anchors. P_ij is 1 for two views of the same clip; two labeled clips
are positives when they share at least ``threshold`` tags, or, in the weighted mode, by their Dice overlap
(capped at 1 together with the same-clip term; tags may weigh differently, e.g. rare ones more).
Unlabeled clips have only their own views as positives, so with no labels in the batch the loss is
exactly NT-Xent (SimCLR / CLMR).

With a queue (MoCo's, holding past projections without gradients, as SupCon's memory banks do), every
anchor also contrasts against the queue's entries: they join the sums over j and k, with targets by the
same rules, a past view of the anchor's own track counting as one of its views.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pair_targets(
    ids: torch.Tensor,
    labels: torch.Tensor,
    other_ids: torch.Tensor,
    other_labels: torch.Tensor,
    threshold: int = 1,
    weighted: bool = False,
    tag_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Targets ``[N, M]`` (float64) between N views and M others: 1 for the same clip or track (equal ids),
    else the label term, shared tags at or above ``threshold`` (or their Dice overlap, each tag counting
    ``tag_weights`` when given: ``2 sum_shared w / (sum_a w + sum_b w)``), capped at 1."""
    labels, other_labels = labels.to(torch.float64), other_labels.to(torch.float64)
    same = (ids[:, None] == other_ids[None, :]).to(torch.float64)
    if weighted:
        w = torch.ones(labels.shape[1], dtype=torch.float64, device=labels.device)
        if tag_weights is not None:
            w = tag_weights.to(torch.float64)
        shared = (labels * w) @ other_labels.T  # the weight of the tags two clips have in common
        denom = ((labels @ w)[:, None] + (other_labels @ w)[None, :]).clamp_min(1e-12)  # 0 / eps: unlabeled
        label_term = 2.0 * shared / denom
    else:
        shared = labels @ other_labels.T  # number of tags two clips have in common
        label_term = (shared >= threshold).to(torch.float64)  # threshold >= 1, so unlabeled rows get 0
    return (same + label_term).clamp_max(1.0)


def target_matrix(
    clip_ids: torch.Tensor,
    labels: torch.Tensor,
    threshold: int = 1,
    weighted: bool = False,
    tag_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The positives matrix P ``[N, N]`` for N views, with a zero diagonal.

    ``clip_ids`` ``[N]`` says which clip each view comes from; ``labels`` ``[N, V]`` is the multi-hot tag
    vector of each view's clip, all zeros for an unlabeled clip (which then has only its own views as
    positives, since it shares no tag with anything).
    """
    targets = pair_targets(clip_ids, labels, clip_ids, labels, threshold, weighted, tag_weights)
    targets.fill_diagonal_(0.0)
    return targets


def semisupcon_anchor_losses(
    z: torch.Tensor,
    targets: torch.Tensor,
    tau: float = 0.1,
    anchors: torch.Tensor | None = None,
    queue: torch.Tensor | None = None,
    queue_targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-anchor loss l_i for the rows ``anchors`` of the batch (all rows when None).

    ``z`` ``[N, d]`` holds every view the anchors contrast against (the global batch with several workers),
    ``targets`` the full ``[N, N]`` P. Only the anchors' rows of the similarity matrix are computed, so each
    worker pays for its own anchors. ``queue`` ``[Q, d]`` (no gradient flows into it) adds Q candidates to
    every anchor, with ``queue_targets`` ``[A, Q]`` (``pair_targets``). The log-softmax is a log-sum-exp,
    stable for any tau.
    """
    n = z.shape[0]
    rows = torch.arange(n, device=z.device) if anchors is None else anchors
    zn = F.normalize(z, dim=1)
    sim = zn[rows] @ zn.T / tau  # [A, N]
    self_mask = rows[:, None] == torch.arange(n, device=z.device)[None, :]
    p = targets[rows]
    if queue is not None and queue_targets is not None and len(queue):
        sim = torch.cat([sim, zn[rows] @ F.normalize(queue.detach(), dim=1).T / tau], dim=1)
        self_mask = torch.cat([self_mask, self_mask.new_zeros(len(rows), len(queue))], dim=1)
        p = torch.cat([p, queue_targets], dim=1)
    sim = sim.masked_fill(self_mask, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    log_prob = log_prob.masked_fill(self_mask, 0.0)  # the diagonal has P = 0; avoid 0 * -inf
    p = p.to(log_prob.dtype)
    return -(p * log_prob).sum(dim=1) / p.sum(dim=1).clamp_min(1.0)


def semisupcon_loss(
    z: torch.Tensor,
    clip_ids: torch.Tensor,
    labels: torch.Tensor,
    tau: float = 0.1,
    threshold: int = 1,
    weighted: bool = False,
) -> torch.Tensor:
    """The SemiSupCon loss of one batch (mean over all anchors); see the module docstring."""
    targets = target_matrix(clip_ids, labels, threshold, weighted)
    return semisupcon_anchor_losses(z, targets, tau).mean()
