"""What to label next: per tag, the unlabeled tracks whose labels would help its probe most.

A track is worth labeling for a tag when the tag's probe (the probe set the tag job applies) is unsure
about it: its score lies near the tag's threshold. The uncertainty is ``exp(-margin)``, where the margin
is ``|logit - logit(threshold)|`` for probability probes and ``|score - threshold|`` for the centroid
probe, so a track on the threshold scores 1. Scoring is one matrix product per block of embeddings, in the
probe set's representation (the learned embedding, the log-mel statistics or both, ``probes``); each
block keeps only its ``pool`` most uncertain tracks per tag (``block_candidates``), the driver merges
blocks into the global pool (``merge_candidates``) and picks a batch of ``per_tag`` from it greedily by
uncertainty, never two tracks whose cosine similarity in the probe's normalised space reaches
``max_similarity`` (``select_diverse``): near-duplicates teach the probe the same thing twice.

``<root>/suggestions/`` is a versioned dataset (see ``versions``) of rows ``tag, track_id, rank, score,
reason``; ``simulate`` replays the loop "suggest, reveal, refit" on a labeled corpus
(``bench/bench_active.py``).

    python -m musiclib.tag.suggest show TAG [--root ROOT] [--n 20]
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy.special import expit, logit

from musiclib import catalog
from musiclib.core import storage, versions
from musiclib.core.config import DEFAULT_ROOT, ConfigError, Layout, RayConfig, check, program
from musiclib.core.outputs import print_table
from musiclib.probe import fewshot, metrics, probes
from musiclib.tag import tags

ROWS_FILE = "rows/suggestions.parquet"
_EPS = 1e-6  # thresholds of probability probes are clipped to (eps, 1 - eps) before the logit

SCHEMA = pa.schema(
    [
        pa.field("tag", pa.string(), nullable=False),
        pa.field("track_id", pa.string(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("score", pa.float32()),
        pa.field("reason", pa.string()),
    ]
)


def candidates_schema(dim: int) -> pa.Schema:
    """A block's candidates: one row per (tag, track), with the track's unit vector in the probe's space
    (a fixed-size list: the driver's merge moves these rows, and fixed-size lists move as one buffer)."""
    return pa.schema(
        [
            pa.field("tag", pa.string()),
            pa.field("track_id", pa.string()),
            pa.field("margin", pa.float64()),
            pa.field("probe_score", pa.float64()),
            pa.field("vector", pa.list_(pa.float32(), dim)),
        ]
    )


@dataclass
class SuggestConfig(RayConfig):
    """Suggest, per tag, the unlabeled tracks to label next (uncertain and not near-duplicates)."""

    root: str = DEFAULT_ROOT
    catalog: str = ""  # the track catalog (musiclib.catalog); empty: <root>/catalog/tracks.parquet
    tags: list[str] = field(default_factory=list)  # empty: every tag the probe set has a probe for
    per_tag: int = 20  # suggestions per tag
    probe_run_id: str = ""  # empty: the latest published tune run (the one the tag job applies)
    run_id: str = ""  # empty: derived from the inputs, so the same inputs give the same version
    max_similarity: float = 0.9  # cosine similarity at which two tracks count as near-duplicates
    pool_factor: int = 5  # each tag's batch is picked from its pool_factor * per_tag most uncertain tracks
    batch_size: int = 1024  # tracks scored at a time
    concurrency: int = 1  # scoring actors

    def validate(self) -> None:
        problems = RayConfig.problems(self)
        if self.per_tag < 1:
            problems.append(f"--per-tag must be at least 1, got {self.per_tag}")
        if not 0.0 < self.max_similarity <= 1.0:
            problems.append(f"--max-similarity must be in (0, 1], got {self.max_similarity}")
        if self.pool_factor < 1 or self.batch_size < 1 or self.concurrency < 1:
            problems.append("--pool-factor, --batch-size and --concurrency must be at least 1")
        bad = [t for t in self.tags if catalog.bad_tag(t)]
        if bad:
            problems.append(f"--tags: bad tag name(s) {bad}")
        check("suggest", problems)

    @property
    def pool(self) -> int:
        return self.pool_factor * self.per_tag


# --------------------------------------------------------------------------- scoring


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)


def threshold_margin(
    probe_set: probes.ProbeSet, x: np.ndarray, columns: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``[n, len(columns)]`` distance of each track's score from each tag's threshold, in logit units for
    probability probes (a step means the same odds ratio at any threshold), and the probe's scores; also
    the normalised embeddings. One matrix product for all tags."""
    z = probe_set.norm(x)
    logits = (z @ probe_set.weights[:, columns] + probe_set.biases[columns]).astype(np.float64)
    t = probe_set.thresholds[columns].astype(np.float64)
    if probe_set.link == "sigmoid":
        return np.abs(logits - logit(np.clip(t, _EPS, 1 - _EPS))), expit(logits), z
    return np.abs(logits - t), logits, z


def block_candidates(
    track_ids: np.ndarray, x: np.ndarray, probe_set: probes.ProbeSet, columns: np.ndarray, pool: int
) -> pa.Table:
    """The ``pool`` most uncertain tracks of one block for each tag in ``columns``, with their normalised
    vectors (what diversity is measured on). Ties go to the smaller track id, so blocks merge the same
    way in any order."""
    if len(track_ids) == 0:
        return candidates_schema(probe_set.weights.shape[0]).empty_table()
    by_id = np.argsort(track_ids, kind="stable")
    track_ids, x = np.asarray(track_ids)[by_id], x[by_id]
    margin, scores, z = threshold_margin(probe_set, x, columns)
    keep = np.argsort(margin, axis=0, kind="stable")[:pool]  # [k, n_tags], stable: id order on ties
    picked = keep.T.ravel()  # tag-major
    n_keep, dim = keep.shape[0], z.shape[1]
    col_of = np.repeat(np.arange(len(columns)), n_keep)
    vectors = _unit(z[picked]).astype(np.float32).ravel()
    return pa.table(
        {
            "tag": np.asarray(probe_set.tags, dtype=object)[columns][col_of],
            "track_id": track_ids[picked].astype(str),
            "margin": margin[picked, col_of],
            "probe_score": scores[picked, col_of],
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors), dim),
        },
        schema=candidates_schema(dim),
    )


def merge_candidates(current: pa.Table | None, block: pa.Table, pool: int) -> pa.Table:
    """Keep each tag's ``pool`` smallest margins (smaller track id first on ties) of two candidate tables."""
    table = block if current is None else pa.concat_tables([current, block])
    order = pc.sort_indices(table, [("tag", "ascending"), ("margin", "ascending"), ("track_id", "ascending")])
    tag_col = np.asarray(table["tag"].take(order).to_numpy(zero_copy_only=False))
    starts = np.r_[0, np.flatnonzero(tag_col[1:] != tag_col[:-1]) + 1]
    lengths = np.diff(np.r_[starts, len(tag_col)])
    within = np.arange(len(tag_col)) - np.repeat(starts, lengths)
    return table.take(order.filter(pa.array(within < pool)))  # the vectors are moved once, kept rows only


def select_diverse(vectors: np.ndarray, n: int, max_similarity: float) -> list[int]:
    """Indices of up to ``n`` rows of ``vectors`` (unit rows, most useful first): each next pick is the
    first row whose cosine similarity to every pick so far is below ``max_similarity``."""
    available = np.ones(len(vectors), dtype=bool)
    picks: list[int] = []
    while len(picks) < n and available.any():
        i = int(np.argmax(available))
        picks.append(i)
        available &= vectors @ vectors[i] < max_similarity
        available[i] = False
    return picks


def select(
    candidates: pa.Table,
    tag_names: list[str],
    thresholds: dict[str, float],
    per_tag: int,
    max_similarity: float,
) -> pa.Table:
    """The suggestion rows: for each tag, a diverse batch of ``per_tag`` from its candidate pool, ranked."""
    parts = []
    for tag in tag_names:
        rows = candidates.filter(pc.field("tag") == tag).sort_by(
            [("margin", "ascending"), ("track_id", "ascending")]
        )
        if len(rows) == 0:
            continue
        vectors = rows["vector"].combine_chunks()
        flat = vectors.flatten().to_numpy(zero_copy_only=False)
        picks = select_diverse(flat.reshape(len(rows), vectors.type.list_size), per_tag, max_similarity)
        margin = rows["margin"].to_numpy()[picks]
        probe_score = rows["probe_score"].to_numpy()[picks]
        parts.append(
            pa.table(
                {
                    "tag": [tag] * len(picks),
                    "track_id": rows["track_id"].take(picks),
                    "rank": np.arange(1, len(picks) + 1, dtype=np.int32),
                    "score": np.exp(-margin).astype(np.float32),
                    "reason": [
                        f"probe score {s:.3f}, threshold {thresholds[tag]:.3f}, margin {m:.2f}"
                        for s, m in zip(probe_score, margin)
                    ],
                },
                schema=SCHEMA,
            )
        )
    return pa.concat_tables(parts) if parts else SCHEMA.empty_table()


# --------------------------------------------------------------------------- inputs of the job


def targets(cfg: SuggestConfig, layout: Layout, inputs: tags.Inputs) -> tuple[list[str], frozenset[str]]:
    """The tags to suggest for (those asked, else every tag with a probe, in the probe set's order) and the
    catalog's labeled tracks (never suggested); a clear one-line error for an unknown tag or a tag without
    a probe."""
    probe_set = inputs.probe_set
    cat = catalog.read(layout.catalog, columns=["track_id", "tags", "split"])
    vocabulary = set(catalog.vocabulary(cat, split=None).tags) | set(probe_set.tags)
    with_probe = [t for j, t in enumerate(probe_set.tags) if probe_set.weights[:, j].any()]
    for tag in cfg.tags:
        if tag not in vocabulary:
            raise ConfigError(f"unknown tag {tag!r}: no track of {layout.catalog} carries it")
        if tag not in with_probe:
            raise ConfigError(
                f"tag {tag!r} has no probe in probe run {inputs.probe_run_id}: label more tracks, run tune"
            )
    wanted = [t for t in with_probe if not cfg.tags or t in cfg.tags]
    labeled = frozenset(
        t for t, labels in zip(cat["track_id"].to_pylist(), cat["tags"].to_pylist()) if labels
    )
    return wanted, labeled


def derive_run_id(cfg: SuggestConfig, layout: Layout, inputs: tags.Inputs, wanted: list[str]) -> str:
    """``--run-id``, else ``suggest-<digest>`` of the probe set, embeddings, catalog version and selection."""
    if cfg.run_id:
        return cfg.run_id
    parts = {
        "probe_set": storage.file_checksum(inputs.probe_uri),
        "embeddings": [inputs.probe_set.model_id, inputs.embedding_version],
        "catalog": catalog.version(layout.catalog),
        "selection": [wanted, cfg.per_tag, cfg.max_similarity, cfg.pool_factor],
    }
    return versions.digest_version("suggest", parts)


# --------------------------------------------------------------------------- reading


def read_version(manifest: versions.Manifest, tag: str | None = None) -> pa.Table:
    """The suggestion rows of one committed version (of one tag when given), by tag then rank."""
    table = storage.read_parquet(manifest.file_uris(), schema=SCHEMA)
    if tag is not None:
        table = table.filter(pc.field("tag") == tag)
    return table.sort_by([("tag", "ascending"), ("rank", "ascending")])


def read_latest(root: str, tag: str | None = None) -> pa.Table:
    """The rows of the version ``_latest`` points at; a clear error when nothing was suggested yet."""
    return read_version(versions.read_latest_manifest(Layout(root).suggestions), tag)


# --------------------------------------------------------------------------- the simulation


def _subset(data: fewshot.ProbeData, rows: np.ndarray, columns: np.ndarray) -> fewshot.ProbeData:
    """``data`` whose training pool is only ``rows`` (the labels revealed so far), for the tags ``columns``."""
    tag_names = [data.tags[j] for j in columns]
    y = {split: labels[:, columns] for split, labels in data.y.items()}
    x = {**data.x, "train": data.x["train"][rows]}
    logmel = {**data.logmel, "train": data.logmel["train"][rows]} if data.logmel else {}
    return dataclasses.replace(data, tags=tag_names, x=x, logmel=logmel, y={**y, "train": y["train"][rows]})


def suggest_indices(
    probe_set: probes.ProbeSet, x: np.ndarray, per_tag: int, max_similarity: float, pool_factor: int
) -> np.ndarray:
    """Rows of ``x`` that the job would suggest over all tags with a probe (their union), in memory."""
    columns = np.flatnonzero(probe_set.weights.any(axis=0))
    ids = np.array([f"{i:09d}" for i in range(len(x))])
    candidates = block_candidates(ids, x, probe_set, columns, pool_factor * per_tag)
    names = [probe_set.tags[j] for j in columns]
    thresholds = dict(zip(probe_set.tags, probe_set.thresholds.tolist()))
    chosen = select(candidates, names, thresholds, per_tag, max_similarity)["track_id"].to_pylist()
    return np.unique(np.array(chosen, dtype=np.int64))


def _next(
    strategy: str,
    probe_set: probes.ProbeSet,
    x: np.ndarray,
    pool: np.ndarray,
    size: int,
    per_tag: int,
    max_similarity: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Rows of ``pool`` to reveal next: the suggestions (``active``) or ``size`` random rows."""
    if strategy == "active":
        return pool[suggest_indices(probe_set, x[pool], per_tag, max_similarity, SuggestConfig.pool_factor)]
    return rng.choice(pool, size=min(len(pool), size), replace=False)


def simulate(
    data: fewshot.ProbeData,
    strategy: str,
    reveal: str,
    start_k: int,
    per_tag: int,
    rounds: int,
    seed: int,
    config: dict[str, Any],
    max_similarity: float = 0.9,
) -> list[dict[str, Any]]:
    """Replay active labeling on a labeled corpus; one row per (round, tag) with the test AP.

    Start from a support set of ``start_k`` positives per tag drawn from the training pool (every tag of
    those tracks known); each round, fit the probe set as the tune job's final fit does (``config``, its
    representation included; thresholds on the validation split), score the test split, then reveal
    ``per_tag`` suggestions per tag (``active``) or random tracks (``random``). ``reveal="track"``: a
    revealed track brings all its tags, the union of every tag's suggestions is revealed and random draws
    ``per_tag`` x tags tracks;
    ``n_labels`` counts labeled tracks. ``reveal="tag"``: each tag is asked about its own tracks only
    ("is this track X?"), every tag has its own probe and pool, and ``n_labels`` counts that tag's labels.
    """
    if strategy not in ("active", "random") or reveal not in ("track", "tag"):
        raise ValueError(f"unknown strategy {strategy!r} or reveal {reveal!r}: active|random, track|tag")
    rng = np.random.default_rng(seed)
    n_tags = len(data.tags)
    start = np.zeros(len(data.y["train"]), dtype=bool)
    start[fewshot.sample_support(data.y["train"], start_k, seed)] = True
    labeled = np.repeat(start[:, None], n_tags, axis=1)  # [tracks, tags]: which labels are known
    groups = [np.arange(n_tags)] if reveal == "track" else [np.array([j]) for j in range(n_tags)]
    group = {t: "head" for t in data.head} | {t: "tail" for t in data.tail}
    features = data.features(fewshot.representation_of(config))
    rows = []
    for r in range(rounds + 1):
        for cols in groups:
            known = np.flatnonzero(labeled[:, cols[0]])
            probe_set = fewshot.final_probe_set(_subset(data, known, cols), config, seed=seed)
            ap = metrics.evaluate(
                data.y["test"][:, cols], probe_set.apply(features["test"]), probe_set.tags
            ).ap
            rows += [
                {"strategy": strategy, "reveal": reveal, "seed": seed, "round": r, "tag": data.tags[j]}
                | {"n_labels": len(known), "group": group[data.tags[j]], "ap": float(a)}
                for j, a in zip(cols, ap)
            ]
            pool = np.flatnonzero(~labeled[:, cols[0]])
            if r < rounds and len(pool):
                new = _next(
                    strategy,
                    probe_set,
                    features["train"],
                    pool,
                    per_tag * len(cols),
                    per_tag,
                    max_similarity,
                    rng,
                )
                labeled[np.ix_(new, cols)] = True
    return rows


# --------------------------------------------------------------------------- the query tool


def main(argv: list[str] | None = None) -> None:
    """``show TAG``: the latest suggestions for a tag, best first."""
    parser = argparse.ArgumentParser(prog=program())
    parser.add_argument("command", choices=["show"])
    parser.add_argument("tag")
    parser.add_argument("--root", default=DEFAULT_ROOT)
    parser.add_argument("--n", type=int, default=20)
    args = parser.parse_args(argv)
    table = read_latest(args.root, args.tag).slice(0, args.n)
    if len(table) == 0:
        raise SystemExit(
            f"no suggestions for {args.tag!r} in the latest version under {Layout(args.root).suggestions}"
        )
    print("  ".join(table.column_names))
    print_table(table)


if __name__ == "__main__":
    main()
