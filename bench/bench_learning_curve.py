"""Few-shot probe AP as pretraining goes, against training minutes: when does training pay, and how fast?

    .venv/bin/python -m bench.bench_learning_curve --root data/bench-rendered \
        --pretrain "--encoder melcnn --width 0.25 --batch-size 64 --lr 1e-3" --minutes 10 --every 1 \
        --out curve.jsonl

Trains in this process with the pretrain job's own code (``pretraining.build``, ``pretraining.fit``; one
worker, every core) on the train split of ``--root``, decoded once into training shards as the pretrain
job decodes them (prepared here without Ray when the root has none). At 0 minutes (the random encoder) and
every ``--every`` minutes of training (steps only: evaluations and checkpoints are not counted), it embeds
the labeled tracks (``--max-chunks`` chunks each, as the study embeds them) with the current encoder and
runs the tune job's few-shot protocol on them (the study's probes and normalisations, 5 repetitions); per
budget the configuration chosen on the validation split gives the macro AP on validation and test, for
all and tail tags. ``--floor`` adds the log-mel floor's line and ``--fused`` each step's fused
representation (the learned embedding beside the log-mel statistics). One JSON line per evaluation,
printed and appended to ``--out``. Results: docs/BENCHMARKS.md and docs/STUDY.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch

from musiclib import catalog
from musiclib.core import storage
from musiclib.core.config import Layout, parse
from musiclib.embed import chunking, embedder, logmel
from musiclib.probe import fewshot, report
from musiclib.probe.sweep import TuneConfig, configurations
from musiclib.train import data, labels, pretraining, shards
from musiclib.train.pretraining import PretrainConfig


def prepare_shards(cfg: PretrainConfig) -> list[str]:
    """The root's training shards, prepared in this process (as the pretrain job does with Ray) if missing."""
    layout = Layout(cfg.root)
    table = catalog.read(layout.catalog, columns=["track_id", "audio_uri", "tags", "split"])
    train = table.filter(pc.equal(table.column("split"), "train"))
    done = set(
        shards.read_shard_columns(shards.committed_shards(layout.shards), ["track_id"])
        .column("track_id")
        .to_pylist()
    )
    for group in shards.plan_shards(train, done, cfg.shard_tracks):
        shards.prepare_shard(
            group, layout.shards, catalog.base_dir(layout.catalog), cfg.max_track_seconds, cfg.segment_seconds
        )
    return shards.committed_shards(layout.shards)


def decode_labeled(root: str, max_chunks: int, cache: str) -> tuple[pa.Table, list[pa.Table]]:
    """The catalog's labeled tracks and their decoded chunks, in batches of 16: decoded once, and kept in
    ``cache`` (a Parquet file) when given, for the next run on the same root."""
    uri = Layout(root).catalog
    tracks, base = catalog.labeled(catalog.read(uri)), catalog.base_dir(uri)
    if cache and storage.exists(cache):
        decoded = storage.read_parquet([cache])
    else:
        cols = ["track_id", "audio_uri"]
        decoded = pa.concat_tables(
            chunking.decode_batch(tracks.slice(i, 16).select(cols), base, max_chunks)
            for i in range(0, tracks.num_rows, 16)
        )
        if cache:
            storage.write_parquet(decoded, cache)
    return tracks, [decoded.slice(i, 16) for i in range(0, len(decoded), 16)]


def embed(encoder: torch.nn.Module, decoded: list[pa.Table], name: str, chunk_batch: int = 0) -> pa.Table:
    chunk_batch = chunk_batch or embedder.chunks_per_forward(0, False, encoder.config)
    with torch.no_grad():
        return pa.concat_tables(embedder.embed_batch(encoder, b, name, chunk_batch) for b in decoded)


def logmel_table(decoded: list[pa.Table]) -> pa.Table:
    """The log-mel floor's embeddings of the decoded tracks (mean and std per band)."""
    floor = logmel.LogMelConfig()
    table = embed(logmel.LogMel(floor), decoded, floor.model_id, chunk_batch=64)
    ok = table.column("error").is_null().to_numpy(zero_copy_only=False)
    values = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    stats = logmel.moments_to_stats(values.reshape(-1, floor.embed_dim))
    return with_vectors(table, np.where(ok[:, None], stats, 0.0))


def with_vectors(table: pa.Table, x: np.ndarray) -> pa.Table:
    column = pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float32).reshape(-1)), x.shape[1])
    return table.set_column(table.column_names.index("embedding"), "embedding", column)


def fused(learned: pa.Table, floor: pa.Table, equal_parts: bool = True) -> pa.Table:
    """Each part standardised over the tracks, side by side; with ``equal_parts`` each part scaled to unit
    total variance, else each dimension to unit variance."""
    parts = []
    for table in (learned, floor):
        x = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        x = x.reshape(len(table), -1).astype(np.float64)
        x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-6) / (np.sqrt(x.shape[1]) if equal_parts else 1.0)
        parts.append(x)
    return with_vectors(learned, np.concatenate(parts, axis=1))


def probe_scores(tracks: pa.Table, emb: pa.Table, probes: TuneConfig) -> dict[str, dict[str, float]]:
    """Per budget, the validation-chosen configuration's macro AP: valid and test, all and tail tags."""
    data = fewshot.prepare(tracks, emb, "curve")
    rows = [
        row
        for config in configurations(probes)
        for row in fewshot.run_config(data, config, probes.repetitions, probes.seed)
    ]
    best = report.best_per_budget(report.trial_summary(pd.DataFrame(rows)))
    return {
        b.budget: {
            f"{split}_{group}": round(getattr(b, f"{split}_ap_{group}_mean"), 4)
            for split in ("valid", "test")
            for group in ("all", "tail")
        }
        | {"trial": b.trial}
        for b in best.itertuples()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="a labeled catalog (train/valid/test splits)")
    parser.add_argument("--pretrain", default="", help="pretrain options (the encoder, batch, lr, ...)")
    parser.add_argument("--minutes", type=float, default=10.0, help="training minutes (the time budget)")
    parser.add_argument("--every", type=float, default=1.0, help="training minutes between evaluations")
    parser.add_argument("--budgets", default="5,20,all")
    parser.add_argument("--probes", default="linear,centroid", help="the study's probes by default")
    parser.add_argument("--max-chunks", type=int, default=2, help="chunks embedded per track (the study's)")
    parser.add_argument("--floor", action="store_true", help="also evaluate the log-mel floor")
    parser.add_argument("--fused", action="store_true", help="also evaluate learned + log-mel, fused")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--cache", default="", help="a Parquet file keeping the decoded labeled tracks")
    parser.add_argument("--skip-random", action="store_true", help="no evaluation before training")
    parser.add_argument("--out", required=True, help="JSON lines, appended")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = parse(
        PretrainConfig,
        ["--root", args.root, "--num-workers", "1", "--steps", "1000000", "--minutes", str(args.minutes)]
        + ["--log-every", "5", "--checkpoint-every", "1000000", *shlex.split(args.pretrain)],
    )
    uris = prepare_shards(cfg)
    training_data = data.load_training_data(uris, labels.plan_labels(uris, cfg.p_s, cfg.seed))
    device = torch.device("cpu")
    model, optimizer, augment = pretraining.build(cfg, device)
    tracks, decoded = decode_labeled(args.root, args.max_chunks, args.cache)
    probes = TuneConfig(budgets=args.budgets.split(","), probes=args.probes.split(","))
    floor = logmel_table(decoded) if args.fused or args.floor else None

    def write(line: dict) -> None:
        text = json.dumps(line)
        print(text, flush=True)
        with open(args.out, "a") as f:
            f.write(text + "\n")

    if args.floor:
        write({"encoder": "logmel", "pretrain": args.pretrain, "scores": probe_scores(tracks, floor, probes)})

    def evaluate(step: int, metrics: dict[str, float]) -> None:
        start = time.perf_counter()
        model.encoder.eval()
        emb = embed(model.encoder, decoded, "curve")
        model.encoder.train()
        line = {
            "encoder": cfg.encoder,
            "pretrain": args.pretrain,
            "step": step,
            "minutes": round(metrics.get("trained_s", 0.0) / 60, 2),
            "loss": round(metrics.get("loss", float("nan")), 4),
            "clips_per_s": round(metrics.get("clips_per_s", float("nan")), 1),
            "scores": probe_scores(tracks, emb, probes),
        }
        if floor is not None and args.fused:
            line["fused"] = probe_scores(tracks, fused(emb, floor), probes)
            line["fused_dims"] = probe_scores(tracks, fused(emb, floor, equal_parts=False), probes)
        line["eval_s"] = round(time.perf_counter() - start, 1)
        write(line)

    due = [args.every]
    window: list[float] = []

    def on_log(step: int, metrics: dict[str, float], last: bool) -> None:
        window.append(metrics["clips_per_s"])
        if metrics["trained_s"] >= 60 * due[0] or last:
            metrics = {**metrics, "clips_per_s": float(np.mean(window))}
            print(pretraining.progress_line(metrics, cfg.steps), flush=True)
            evaluate(step, metrics)
            window.clear()
            while due[0] * 60 <= metrics["trained_s"]:
                due[0] += args.every

    if not args.skip_random:
        evaluate(0, {})
    pretraining.fit(model, optimizer, augment, training_data, cfg, device, report=on_log)


if __name__ == "__main__":
    main()
