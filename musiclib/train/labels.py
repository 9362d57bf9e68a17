"""Which labels pretraining uses: the labeled tracks that keep their tags (``p_s``), and what a card says.

``select_labels`` keeps exactly ``round(p_s * n_labeled)`` tracks' tags, the same on every worker and
nested across budgets; ``plan_labels`` applies it to the usable tracks of the shards. ``positive_share``
measures how many labeled pairs the loss counts as positives (``losses.target_matrix``), and
``label_facts`` / ``describe_labels`` are what the model card and the job's first lines report.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from musiclib.catalog import label_matrix
from musiclib.train.losses import target_matrix
from musiclib.train.shards import read_shard_columns


class LabelSettings(Protocol):
    """The label fields of a pretraining config (``PretrainConfig`` has them)."""

    p_s: float
    b_s: float
    label_threshold: int
    weighted: bool
    idf: bool


def _unit_hash(seed: int, key: str) -> float:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") / 2.0**64


def select_labels(track_ids: list[str], tags: list[list[str]], p_s: float, seed: int) -> dict[str, list[str]]:
    """Tags kept for training: exactly ``round(p_s * n_labeled)`` labeled tracks keep theirs.

    The choice is a seeded hash order, so every worker computes the same subset without talking, and a
    smaller ``p_s`` keeps a subset of what a larger one keeps (label budgets are nested).
    """
    labeled = sorted((_unit_hash(seed, t), t) for t, g in zip(track_ids, tags, strict=True) if g)
    kept = {t for _, t in labeled[: round(p_s * len(labeled))]}
    return {t: sorted(set(g)) if t in kept else [] for t, g in zip(track_ids, tags, strict=True)}


@dataclass
class LabelPlan:
    """Which tracks keep which tags, the tag vocabulary, and the counts a model card reports."""

    kept: dict[str, list[str]]
    vocabulary: list[str]
    labeled_in_catalog: int

    @property
    def labeled_used(self) -> int:
        return sum(1 for g in self.kept.values() if g)

    def tag_weights(self, idf: bool) -> np.ndarray:
        """Each vocabulary tag's weight in Dice targets: 1, or with ``idf`` ``log(labeled tracks / tracks with
        the tag)``, so a tag every labeled track carries says nothing and a rare one says most."""
        if not idf:
            return np.ones(len(self.vocabulary))
        counts = label_matrix(list(self.kept.values()), self.vocabulary).sum(axis=0)
        return np.log(max(self.labeled_used, 1) / np.maximum(counts, 1))


def plan_labels(shard_uris: list[str], p_s: float, seed: int) -> LabelPlan:
    """The label plan over every usable track in the shards (reads only the small metadata columns)."""
    meta = read_shard_columns(shard_uris, ["track_id", "tags", "error"]).to_pydict()
    usable = [
        (t, g or []) for t, g, e in zip(meta["track_id"], meta["tags"], meta["error"], strict=True) if not e
    ]
    kept = select_labels([t for t, _ in usable], [g for _, g in usable], p_s, seed)
    vocabulary = sorted({tag for g in kept.values() for tag in g})
    return LabelPlan(kept, vocabulary, labeled_in_catalog=sum(1 for _, g in usable if g))


POSITIVES_WARNING = 0.5  # above this mean label target, labels barely tell labeled clips apart


def positive_share(
    plan: LabelPlan, threshold: int, weighted: bool, max_tracks: int = 2000, idf: bool = False
) -> float | None:
    """The mean label target ``P_ij`` between two distinct labeled tracks the plan keeps (``target_matrix``):
    the share of labeled pairs that count as positives, or their mean Dice weight. Near 1, almost every
    pair of labeled clips is a positive and the labels add little contrast (dense multi-label catalogs at
    ``--label-threshold 1``). On a seeded sample of ``max_tracks``; None with fewer than two labeled tracks."""
    labeled = sorted(t for t, tags in plan.kept.items() if tags)
    if len(labeled) < 2:
        return None
    if len(labeled) > max_tracks:
        labeled = sorted(np.random.default_rng(0).choice(labeled, max_tracks, replace=False).tolist())
    labels = torch.from_numpy(label_matrix([plan.kept[t] for t in labeled], plan.vocabulary))
    weights = torch.from_numpy(plan.tag_weights(idf))
    targets = target_matrix(torch.arange(len(labeled)), labels, threshold, weighted, weights)
    return float(targets.sum()) / (len(labeled) * (len(labeled) - 1))


def label_facts(plan: LabelPlan, cfg: LabelSettings) -> dict[str, Any]:
    """What a model card records of the labels pretraining used, with their mean target (``positive_share``)."""
    return {
        "p_s": cfg.p_s,
        "b_s": cfg.b_s,
        "labeled_tracks_in_catalog": plan.labeled_in_catalog,
        "labeled_tracks_used": plan.labeled_used,
        "tags_used": len(plan.vocabulary),
        "positives": ("Dice-weighted" + (", tags by idf" if cfg.idf else ""))
        if cfg.weighted
        else f"--label-threshold {cfg.label_threshold}",
        "mean_label_target": positive_share(plan, cfg.label_threshold, cfg.weighted, idf=cfg.idf),
    }


def describe_labels(facts: dict[str, Any]) -> str:
    """One line on the labels pretraining uses (``label_facts``), with a hint when most pairs are positives."""
    line = (
        f"labels: {facts['labeled_tracks_used']} of {facts['labeled_tracks_in_catalog']} labeled tracks used "
        f"(p_s {facts['p_s']}), {facts['tags_used']} tags"
    )
    share = facts["mean_label_target"]
    if share is None:
        return line
    line += f"; mean target between two labeled tracks {share:.0%} ({facts['positives']})"
    if share > POSITIVES_WARNING:
        line += (
            ": most labeled pairs are positives, so the labels separate few clips "
            "(--weighted true or a higher --label-threshold lower this; docs/STUDY.md)"
        )
    return line
