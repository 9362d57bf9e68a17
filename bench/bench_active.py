"""Simulate "what to label next": active suggestions against random selection, same labels, head vs tail.

    .venv/bin/python -m bench.bench_active                      # synthetic corpus (embeddings follow tags)
    .venv/bin/python -m bench.bench_active --root data/demo     # the demo's real embeddings (after make demo)
    .venv/bin/python -m bench.bench_active --scoring 100000     # the job's per-block scoring, its floor

On a fully labeled corpus (labels of the training pool hidden until revealed), each repetition starts from
``--start-k`` positives per tag and runs ``--rounds`` of: fit the probe set as the tune job's final fit
does (thresholds on the validation split), then reveal the labels of the union of every tag's
``--per-tag`` suggestions per tag (``musiclib.tag.suggest.simulate``, ``active``) or of as many random
tracks (``random``); ``--reveal`` says whether a label is one tag's answer about a track or a whole
track. It prints the mean test AP per round and the labels each strategy needs to reach ``--targets``
shares of the AP that all training labels give, for the head and the tail tags.

``--scoring N`` instead times the job's per-block work (``block_candidates`` and the driver's
``merge_candidates``) over N tracks in one process against its floor, the probe set applied alone.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import threadpoolctl

from musiclib import catalog
from musiclib.core.config import Layout
from musiclib.datasets import tagged_embeddings
from musiclib.embed import table as embeddings_table
from musiclib.probe import fewshot, metrics, probes
from musiclib.tag import suggest
from musiclib.train import models

PROBE = {"budget": "all", "probe": "logreg", "norm": "standardize", "C": 1.0}


def load(args: argparse.Namespace) -> fewshot.ProbeData:
    """The labeled corpus: a demo root's catalog and latest embeddings, or a synthetic one."""
    if args.root:
        layout = Layout(args.root)
        model_id = models.model_id_or_latest(layout.models, "")
        cat = catalog.read(layout.catalog)
        emb = embeddings_table.read(layout.embeddings, model_id)
        return fewshot.prepare(cat, emb, model_id)
    cat, emb = tagged_embeddings.make(
        n_tracks=args.n_tracks,
        n_tags=args.n_tags,
        dim=args.dim,
        labeled_fraction=1.0,
        noise=args.noise,
        seed=args.seed,
    )
    return fewshot.prepare(cat, emb, "synthetic")


def needed(curve: pd.DataFrame, target: float) -> str:
    """Mean labels at the first round whose mean AP reaches ``target``; ``>N`` when none does."""
    reached = curve[curve["ap"] >= target]
    return f"{reached['n_labels'].iloc[0]:.0f}" if len(reached) else f">{curve['n_labels'].iloc[-1]:.0f}"


def bench_scoring(n: int, dim: int, n_tags: int, per_tag: int, block: int) -> None:
    """Tracks/s of candidate scoring and merging per block against the probe set applied alone."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(block, dim)).astype(np.float32)
    probe_set = probes.ProbeSet(
        tags=[f"tag{j:02d}" for j in range(n_tags)],
        weights=(0.05 * rng.normal(size=(dim, n_tags))).astype(np.float32),
        biases=np.zeros(n_tags, np.float32),
        norm=probes.fit_normalizer("standardize", x),
        thresholds=np.full(n_tags, 0.5, np.float32),
    )
    ids = np.array([f"t{i:09d}" for i in range(n)])
    columns, pool, n_blocks = np.arange(n_tags), suggest.SuggestConfig.pool_factor * per_tag, n // block
    start = time.perf_counter()
    for _ in range(n_blocks):
        probe_set.apply(x)
    floor = time.perf_counter() - start
    start = time.perf_counter()
    merged = None
    for b in range(n_blocks):
        candidates = suggest.block_candidates(ids[b * block : (b + 1) * block], x, probe_set, columns, pool)
        merged = suggest.merge_candidates(merged, candidates, pool)
    took = time.perf_counter() - start
    tracks = n_blocks * block
    print(
        f"{tracks} tracks, dim {dim}, {n_tags} tags, pool {pool} per tag, blocks of {block}, 1 thread: "
        f"probe set alone {tracks / floor:,.0f} tracks/s; candidates + merge {tracks / took:,.0f} tracks/s "
        f"({took / floor:.1f}x the floor); candidate rows per block {len(candidates)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="", help="a root after make demo; empty: synthetic corpus")
    parser.add_argument("--n-tracks", type=int, default=4000)
    parser.add_argument("--n-tags", type=int, default=24)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--noise", type=float, default=1.5)
    parser.add_argument("--reveal", choices=["tag", "track"], default="tag", help="what one label is")
    parser.add_argument("--start-k", type=int, default=1)
    parser.add_argument("--per-tag", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=24)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--max-similarity", type=float, default=0.9)
    parser.add_argument("--targets", default="0.75,0.9", help="shares of the all-labels AP to reach")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scoring", type=int, default=0, help="time the per-block scoring over N tracks")
    parser.add_argument("--block", type=int, default=1024, help="--scoring: tracks per block")
    args = parser.parse_args()
    threadpoolctl.threadpool_limits(1)
    if args.scoring:
        bench_scoring(args.scoring, args.dim, args.n_tags, args.per_tag, args.block)
        return

    data = load(args)
    full = fewshot.final_probe_set(data, PROBE)
    full_ap = metrics.evaluate(data.y["test"], full.apply(data.x["test"]), data.tags)
    print(
        f"corpus: {len(data.y['train'])} training tracks (labels hidden until revealed), "
        f"{len(data.y['valid'])} valid, {len(data.y['test'])} test, {len(data.tags)} tags "
        f"({len(data.head)} head, {len(data.tail)} tail); probe {PROBE}"
    )
    start = time.perf_counter()
    rows = []
    for rep in range(args.repetitions):
        for strategy in ("active", "random"):
            rows += suggest.simulate(
                data,
                strategy,
                args.reveal,
                args.start_k,
                args.per_tag,
                args.rounds,
                args.seed + rep,
                PROBE,
                args.max_similarity,
            )
    frame = pd.DataFrame(rows)
    print(f"{args.repetitions} repetitions x 2 strategies in {time.perf_counter() - start:.0f} s")

    # macro AP (and mean labels) per (strategy, seed, round, group), then the mean over repetitions
    macro = frame.groupby(["strategy", "seed", "round", "group"], as_index=False)[["ap", "n_labels"]].mean()
    curves = macro.groupby(["strategy", "group", "round"])[["ap", "n_labels"]].mean()
    shares = [float(v) for v in args.targets.split(",")]
    full_macro = {g: full_ap.macro(getattr(data, g))["ap"] for g in ("head", "tail")}
    unit = "labels per tag" if args.reveal == "tag" else "labeled tracks"
    print(
        f"all {len(data.y['train'])} training labels: head AP {full_macro['head']:.3f}, "
        f"tail AP {full_macro['tail']:.3f}; x axis: {unit}"
    )
    print("\nround  labels  active head  tail  |  labels  random head  tail")
    for r in range(args.rounds + 1):
        cells = [
            f"{curves.loc[(s, 'tail', r), 'n_labels']:>6.0f}  {curves.loc[(s, 'head', r), 'ap']:>11.3f}  "
            f"{curves.loc[(s, 'tail', r), 'ap']:>4.3f}"
            for s in ("active", "random")
        ]
        print(f"{r:>5}  " + "  |  ".join(cells))
    print(f"\n{unit} to reach a share of the all-labels AP (mean over repetitions):")
    print("| group | share | target AP | active | random |")
    print("| --- | --- | --- | --- | --- |")
    for g in ("head", "tail"):
        for share in shares:
            target = share * full_macro[g]
            need = [needed(curves.loc[(s, g)], target) for s in ("active", "random")]
            print(f"| {g} | {share:.0%} | {target:.3f} | {need[0]} | {need[1]} |")


if __name__ == "__main__":
    main()
