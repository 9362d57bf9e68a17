"""Few-shot probe AP as pretraining goes, from the random encoder (step 0) on: when does training pay?

    .venv/bin/python -m bench.bench_learning_curve --root data/demo --eval-root data/demo-eval \
        --every 20 --out curve.jsonl --pretrain "--steps 100 --lr 1e-3 --warmup 10 --cosine true"

Trains in this process with the pretrain job's own code (``pretraining.build``, ``pretraining.fit``; the
demo's encoder, one worker) on the shards the pretrain job prepared under ``--root``. At step 0 and every
``--every`` steps it embeds the labeled tracks of ``--eval-root`` with the current encoder and runs the
tune job's few-shot protocol on them (linear and centroid probes, standardised, 5 repetitions), printing
and appending one JSON line of macro AP on the validation and the test split per budget. The demo's own
splits hold about 25 labeled tracks each, too few to tell two encoders apart, so ``--eval-root`` is a
catalog from the same generator with another seed and every track labeled
(``jobs/make_demo_catalog.py --n-tracks 900 --labeled-fraction 1 --seed 7``). Results: docs/STUDY.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time

import pandas as pd
import pyarrow as pa
import torch

from musiclib import catalog
from musiclib.core.config import Layout, parse
from musiclib.embed import embedder
from musiclib.probe import fewshot, report
from musiclib.probe.sweep import TuneConfig, configurations
from musiclib.train import pretraining, shards
from musiclib.train.pretraining import PretrainConfig

# the demo's encoder and batch (Makefile: PRETRAIN_DEMO)
DEMO = "--width 0.25 --num-workers 1 --batch-size 20 --p-pitch 0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data/demo", help="where the pretrain job prepared its shards")
    parser.add_argument("--eval-root", required=True, help="a demo catalog with every track labeled")
    parser.add_argument("--pretrain", default="", help="pretrain options on top of the demo's encoder")
    parser.add_argument("--every", type=int, default=20, help="steps between two evaluations")
    parser.add_argument("--budgets", default="5,20,all")
    parser.add_argument("--max-chunks", type=int, default=16, help="chunks embedded per evaluation track")
    parser.add_argument("--out", required=True, help="JSON lines, appended")
    args = parser.parse_args()

    cfg = parse(
        PretrainConfig,
        ["--root", args.root, *shlex.split(DEMO), "--log-every", str(args.every)]
        + ["--checkpoint-every", str(args.every), *shlex.split(args.pretrain)],
    )
    uris = shards.committed_shards(Layout(cfg.root).shards)
    if not uris:
        raise SystemExit(f"no training shards under {cfg.root}: run `make demo-catalog pretrain` first")
    data = pretraining.load_training_data(uris, pretraining.plan_labels(uris, cfg.p_s, cfg.seed))
    device = torch.device("cpu")
    model, optimizer, augment = pretraining.build(cfg, device)

    eval_catalog = Layout(args.eval_root).catalog
    tracks, base = catalog.labeled(catalog.read(eval_catalog)), catalog.base_dir(eval_catalog)
    cols = ["track_id", "audio_uri"]
    decoded = [  # once: every evaluation embeds the same audio
        embedder.decode_batch(tracks.slice(i, 16).select(cols), base, args.max_chunks)
        for i in range(0, tracks.num_rows, 16)
    ]
    chunk_batch = embedder.chunks_per_forward(0, False, model.encoder.config)
    probes = TuneConfig(budgets=args.budgets.split(","), probes=["linear", "centroid"], norms=["standardize"])

    def evaluate(step: int) -> None:
        start = time.perf_counter()
        model.encoder.eval()
        with torch.no_grad():
            emb = pa.concat_tables(
                embedder.embed_batch(model.encoder, batch, "curve", chunk_batch, device) for batch in decoded
            )
        model.encoder.train()
        probe_data = fewshot.prepare(tracks, emb, "curve")
        rows = [
            row
            for config in configurations(probes)
            for row in fewshot.run_config(probe_data, config, probes.repetitions, probes.seed)
        ]
        line: dict = {"step": step}
        for trial in report.trial_summary(pd.DataFrame(rows)).itertuples():
            line[f"{trial.probe}-{trial.budget}"] = {
                split: round(getattr(trial, f"{split}_ap_all_mean"), 4) for split in ("valid", "test")
            }
        line["eval_s"] = round(time.perf_counter() - start, 1)
        text = json.dumps(line)
        print(text, flush=True)
        with open(args.out, "a") as f:
            f.write(text + "\n")

    def on_log(step: int, metrics: dict[str, float], due: bool) -> None:
        print(pretraining.progress_line(metrics, cfg.steps), flush=True)
        if due:
            evaluate(step)

    evaluate(0)
    pretraining.fit(model, optimizer, augment, data, cfg, device, report=on_log)


if __name__ == "__main__":
    main()
