"""Few-shot support sets for multi-label data: how many labels a budget of k per tag really buys.

A budget k asks for at least k positive tracks per tag from the training pool. Tracks are drawn greedily
and each drawn track counts toward every tag it carries, so co-occurring tags do not waste labels. A drawn
track is a negative for every tag it does not carry. Budget ``None`` ("all") uses the whole pool.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from musiclib import catalog
from musiclib.embed import table as embeddings_table
from musiclib.probe import metrics, probes

EVAL_SPLITS = ("valid", "test")  # configurations are chosen on valid; test only reports the chosen ones


def parse_budget(raw: str | int | None) -> int | None:
    """``"all"``/None to None, else a positive integer; a clear error for anything else."""
    if raw is None or (isinstance(raw, str) and raw.strip().lower() == "all"):
        return None
    try:
        k = int(raw)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bad label budget {raw!r}: use a positive integer or 'all'") from exc
    if k < 1:
        raise ValueError(f"bad label budget {raw!r}: use a positive integer or 'all'")
    return k


def budget_name(budget: int | None) -> str:
    return "all" if budget is None else str(budget)


def sample_support(y: np.ndarray, budget: int | None, seed: int) -> np.ndarray:
    """Row indices of a support set with at least ``budget`` positives per tag whenever the pool has them.

    Tags are served rarest first (their positives are the scarce ones, and drawing them often covers
    frequent tags for free); within a tag, positives are drawn in a seeded random order. Sorted indices.
    """
    n, n_tags = y.shape
    if budget is None:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    chosen = np.zeros(n, dtype=bool)
    counts = np.zeros(n_tags, dtype=np.int64)
    pool = y.sum(axis=0)
    for j in np.argsort(pool, kind="stable"):
        need = min(budget, int(pool[j])) - counts[j]
        if need <= 0:
            continue
        candidates = order[y[order, j] & ~chosen[order]][:need]
        chosen[candidates] = True
        counts += y[candidates].sum(axis=0)
    return np.flatnonzero(chosen)


def support_sets(y: np.ndarray, budget: int | None, repetitions: int, seed: int) -> list[np.ndarray]:
    """``repetitions`` independent support sets (seeds ``seed``, ``seed + 1``, ...); one set for ``all``."""
    if budget is None:
        return [sample_support(y, None, seed)]
    return [sample_support(y, budget, seed + r) for r in range(repetitions)]


# --------------------------------------------------------------------------- the protocol on a catalog


@dataclass
class ProbeData:
    """Embeddings and human labels of one model, split for the few-shot protocol; plain arrays only.

    ``train`` is the labeled training pool support sets are drawn from; ``valid`` and ``test`` hold the
    labeled tracks of those splits. ``x`` holds the learned embeddings, ``logmel`` the log-mel statistics
    of the same tracks when the embeddings table has them (else it is empty); ``features`` gives either or
    both side by side. ``excluded`` maps track ids to why they cannot be used (the embed job's error,
    ``no vector`` or ``no embedding``); ``head``/``tail`` split tags by training-label count.
    """

    tags: list[str]
    head: list[str]
    tail: list[str]
    train_counts: dict[str, int]
    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    track_ids: dict[str, list[str]]
    model_id: str
    excluded: dict[str, str] = field(default_factory=dict)
    logmel: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def representations(self) -> tuple[str, ...]:
        """The representations the data offers: all of them with log-mel statistics, else the embedding."""
        return embeddings_table.REPRESENTATIONS if self.logmel else ("embedding",)

    def features(self, representation: str) -> dict[str, np.ndarray]:
        """Each split's vectors in ``representation`` (``fused``: the embedding, then the statistics, as
        ``embeddings_table.matrix`` gives them); a one-line ``ConfigError`` when the data lacks them."""
        embeddings_table.require(representation, self.representations, f"the embeddings of {self.model_id}")
        if representation == "embedding":
            return self.x
        if representation == "logmel":
            return self.logmel
        return {split: np.hstack([x, self.logmel[split]]) for split, x in self.x.items()}

    def parts(self, representation: str) -> list[int]:
        """The sizes of the parts ``features(representation)`` holds side by side (``fused``); else none."""
        if representation != "fused":
            return []
        return [self.x["train"].shape[1], self.logmel["train"].shape[1]]


def prepare(
    catalog_table: pa.Table, embeddings: pa.Table, model_id: str, head_fraction: float = 0.2
) -> ProbeData:
    """Join human labels (catalog ``tags``) with embeddings on ``track_id``; only labeled tracks are kept.

    Rows whose embedding carries an error, and labeled tracks without an embedding, are excluded and
    recorded with the reason. The vocabulary is the tags of the usable labeled training tracks. The
    log-mel statistics come along when ``embeddings`` has the ``logmel`` column.
    """
    cat = catalog_table.select(["track_id", "tags", "split"]).to_pydict()
    has_logmel = embeddings_table.LOGMEL in embeddings.column_names
    emb = embeddings.select(embeddings_table.columns("fused" if has_logmel else "embedding")).to_pydict()
    stats = emb.get(embeddings_table.LOGMEL, [()] * len(emb["track_id"]))
    excluded: dict[str, str] = {}
    vectors: dict[str, list[float]] = {}
    floor: dict[str, list[float]] = {}
    for tid, vec, stat, err in zip(emb["track_id"], emb["embedding"], stats, emb["error"], strict=True):
        if err is not None or vec is None or stat is None:
            excluded[tid] = err or "no vector"  # the embed job's reason
        else:
            vectors[tid], floor[tid] = vec, stat
    rows: dict[str, list[tuple[str, list[str]]]] = {s: [] for s in ("train", "valid", "test")}
    for tid, tags, split in zip(cat["track_id"], cat["tags"], cat["split"], strict=True):
        if not tags or split not in rows:
            continue
        if tid in vectors:
            rows[split].append((tid, list(tags)))
        elif tid not in excluded:
            excluded[tid] = "no embedding"
    train = pa.table({"tags": [t for _, t in rows["train"]], "split": ["train"] * len(rows["train"])})
    vocab = catalog.vocabulary(train, split="train", head_fraction=head_fraction)
    x, y, ids, logmel = {}, {}, {}, {}
    for split, items in rows.items():
        ids[split] = [tid for tid, _ in items]
        x[split] = _stack([vectors[tid] for tid in ids[split]], vectors)
        if has_logmel:
            logmel[split] = _stack([floor[tid] for tid in ids[split]], floor)
        y[split] = catalog.label_matrix([t for _, t in items], vocab.tags)
    return ProbeData(vocab.tags, vocab.head, vocab.tail, vocab.counts, x, y, ids, model_id, excluded, logmel)


def _stack(rows: list[list[float]], every: dict[str, list[float]]) -> np.ndarray:
    """``rows`` as a float32 matrix as wide as the vectors in ``every`` (0 wide when there are none)."""
    dim = len(next(iter(every.values()))) if every else 0
    return np.array(rows, dtype=np.float32).reshape(len(rows), dim)


def hyperparameters(config: dict[str, Any]) -> dict[str, Any]:
    """The probe's own settings in a sweep configuration: everything but budget, probe, representation and
    normalisation."""
    return {k: v for k, v in config.items() if k not in ("budget", "probe", "representation", "norm")}


def representation_of(config: dict[str, Any]) -> str:
    """What a configuration's probes read; configurations without one read the learned embedding."""
    return config.get("representation", "embedding")


def params_text(params: dict[str, Any]) -> str:
    """Hyperparameters as ``k=v`` pairs in key order, the form results and trial ids carry."""
    return ",".join(f"{k}={params[k]}" for k in sorted(params))


def trial_key(config: dict[str, Any]) -> str:
    """A stable, readable id of one sweep configuration (budget, probe, representation when it is not the
    learned embedding, normalisation, hyperparameters)."""
    params = params_text(hyperparameters(config))
    representation = representation_of(config)
    shown = "" if representation == "embedding" else f"{representation}-"
    return f"{config['budget']}-{config['probe']}-{shown}{config['norm']}" + (f"-{params}" if params else "")


def run_config(data: ProbeData, config: dict[str, Any], repetitions: int, seed: int) -> list[dict[str, Any]]:
    """Evaluate one configuration over all tags and all repetitions; one row per (repetition, tag).

    ``config`` holds ``budget`` ("all" or an integer), ``probe``, ``representation`` (default: the learned
    embedding), ``norm`` and the probe's hyperparameters.
    Each repetition draws a support set from the training pool, fits the probe for every tag at once,
    and scores the validation split (``valid_*``: what configurations are chosen on) and the test split
    (``test_*``: what is reported for the chosen ones). Rows carry the fit time so the sweep can measure
    its own overhead.
    """
    budget = parse_budget(config["budget"])
    params = hyperparameters(config)
    key, text, representation = trial_key(config), params_text(params), representation_of(config)
    features = data.features(representation)
    group = {t: "head" for t in data.head} | {t: "tail" for t in data.tail}
    rows = []
    for rep, support in enumerate(support_sets(data.y["train"], budget, repetitions, seed)):
        start = time.perf_counter()
        x, y = features["train"][support], data.y["train"][support]
        probe = probes.fit(
            config["probe"],
            x,
            y,
            data.tags,
            norm=config["norm"],
            params=params,
            seed=seed + rep,
            representation=representation,
            parts=data.parts(representation),
        )
        scored = {
            split: metrics.evaluate(data.y[split], probe.apply(features[split]), data.tags)
            for split in EVAL_SPLITS
        }
        seconds = time.perf_counter() - start
        for j, tag in enumerate(data.tags):
            row = {
                "trial": key,
                "budget": budget_name(budget),
                "probe": config["probe"],
                "representation": representation,
                "norm": config["norm"],
                "params": text,
                "rep": rep,
                "tag": tag,
                "group": group[tag],
                "n_support": len(support),
                "n_support_pos": int(y[:, j].sum()),
            }
            for split, result in scored.items():
                row[f"n_{split}_pos"] = int(result.n_pos[j])
                row[f"{split}_roc_auc"] = float(result.roc_auc[j])
                row[f"{split}_ap"] = float(result.ap[j])
            rows.append(row | {"fit_s": seconds / len(data.tags)})
    return rows


def final_probe_set(
    data: ProbeData, config: dict[str, Any], target_precision: float | None = None, seed: int = 0
) -> probes.ProbeSet:
    """Refit a configuration on every labeled training track, in its representation, and choose each
    tag's threshold.

    Thresholds come from the validation split (target precision, else maximum F1); a tag with no
    validation positive falls back to its training scores, so every tag can be written back.
    """
    params, representation = hyperparameters(config), representation_of(config)
    features = data.features(representation)
    probe = probes.fit(
        config["probe"],
        features["train"],
        data.y["train"],
        data.tags,
        config["norm"],
        params,
        seed,
        data.model_id,
        representation,
        data.parts(representation),
    )
    valid_scores = probe.apply(features["valid"]) if len(features["valid"]) else None
    train_scores = probe.apply(features["train"])
    thresholds = np.empty(len(data.tags), np.float32)
    for j in range(len(data.tags)):
        t = (
            None
            if valid_scores is None
            else metrics.choose_threshold(data.y["valid"][:, j], valid_scores[:, j], target_precision)
        )
        if t is None:
            t = metrics.choose_threshold(data.y["train"][:, j], train_scores[:, j], target_precision)
        thresholds[j] = t
    probe.thresholds = thresholds
    probe.config = {**probe.config, "target_precision": target_precision, "threshold_split": "valid"}
    return probe
