"""study: which encoder buys the most per label? No, few and all labels in pretraining, against two floors.

    python -m jobs.study --root data/bench-rendered [--encoders clmr,supervised] [--seeds 0,1,2] ...

1. Check the config (every pass-through option by its own job's config) and the catalog, before Ray.
2. Under the study's lease, in one Ray session, for each encoder and seed (``study.variants``) whose rows
   are not written yet, under the study's own work root (``study.work_root``: the catalog's audio, its own
   shards, runs, models, embeddings and probe runs):
   - a trained encoder: the pretrain job (``jobs.pretrain.run``) with the encoder's label settings
     (``study.pretrain_config``: the same family and time budget for all), then the embed job; the random
     encoder: the seed's initial weights exported, then the embed job; the log-mel floor: the log-mel
     statistics the embed job wrote beside the random encoder's embeddings; the fused representation:
     ``study.FUSED_WITH``'s embeddings of the same seed beside their log-mel statistics;
   - the tune job's few-shot sweep on what the variant reads (``study.REPRESENTATION``); per budget, the
     configuration chosen on the validation split and its test scores per repetition become the rows.
3. Write results.parquet, study.md and study.png under ``<root>/study/<run_id>/`` and publish the run.
Running the same command again skips the variants already evaluated (and a finished study entirely).
With ``--mlflow-uri``, an MLflow run gets the config and the results, with a nested run per variant.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import nullcontext

import pandas as pd
import pyarrow as pa

from musiclib import catalog
from musiclib.core import lifecycle, storage, tracking, versions
from musiclib.core.config import Layout, parse
from musiclib.core.ray_env import ray_session
from musiclib.study import study
from musiclib.study.study import StudyConfig
from musiclib.train import models

from . import embed, pretrain, tune

TRACKING_TAGS = {"musiclib.job": "study"}


def make_encoder(cfg: StudyConfig, work: Layout, encoder: str, seed: int) -> tuple[str, dict[str, float]]:
    """Train (or initialise) and embed one encoder under the work root; its model id, and the stages'
    seconds and the pretraining steps (0 untrained)."""
    seconds = {}
    start = time.perf_counter()
    if encoder == "fused":  # the embeddings of the trained encoder it reads, already evaluated
        rows = storage.read_parquet(
            [study.rows_uri(work.root, study.FUSED_WITH, seed)], ["model_id", "steps"]
        )
        return rows["model_id"][0].as_py(), {
            "pretrain_s": 0.0,
            "embed_s": 0.0,
            "steps": rows["steps"][0].as_py(),
        }
    untrained = encoder in ("random", "logmel")  # the floor reads the random encoder's log-mel column
    pretrain_cfg = study.pretrain_config(cfg, work.root, "clmr" if untrained else encoder, seed)
    if untrained:  # the weights pretraining with this seed starts from
        model_id = models.export_random_encoder(work.models, pretrain_cfg.encoder_config(), seed)
    else:
        model_id = pretrain.run(pretrain_cfg).result
    seconds["pretrain_s"] = time.perf_counter() - start
    seconds["steps"] = models.load_card(work.models, model_id).get("steps", 0)
    start = time.perf_counter()
    embed.run(study.embed_config(cfg, work.root, model_id))
    seconds["embed_s"] = time.perf_counter() - start
    return model_id, seconds


def evaluate(
    cfg: StudyConfig, work: Layout, model_id: str, local: bool, encoder: str
) -> tuple[pd.DataFrame, float]:
    """The tune job's sweep on a model's embeddings, as ``encoder`` reads them: its results and seconds."""
    start = time.perf_counter()
    manifest = tune.run(study.tune_config(cfg, work.root, model_id, local, encoder)).result
    results_uri = storage.join(versions.version_uri(work.probes, manifest.version), "results.parquet")
    return storage.read_parquet([results_uri]).to_pandas(), time.perf_counter() - start


def log_results(tracked: tracking.Tracked | None, rows: pd.DataFrame, out: str) -> None:
    """The study's results on its MLflow run: the test means per encoder, budget, metric and tag group
    (``study.summary_metrics``), and its files (the results table, study.md, study.png)."""
    tracking.log_metrics(tracked, study.summary_metrics(rows))
    tracking.log_files(tracked, [storage.join(out, name) for name in study.OUTPUTS])


def run(cfg: StudyConfig) -> lifecycle.Summary[versions.Manifest]:
    """Evaluate every encoder and seed not evaluated yet, then write and publish the study run (a finished
    study is only made current); the summary's result is the run's manifest."""
    job = lifecycle.Job("study", cfg.root)
    layout = Layout(cfg.root, cfg.catalog)
    catalog.validate(layout.catalog)
    run_id = study.derive_run_id(cfg, layout)
    work = Layout(study.work_root(cfg.root, run_id))
    with versions.lease(layout.study):  # one study at a time writes the study runs
        if (done := job.already_complete(layout.study, run_id)) is not None:
            return done
        todo = [(e, s) for e, s in study.variants(cfg) if not storage.exists(study.rows_uri(work.root, e, s))]
        print(f"study: run {run_id}: {len(study.variants(cfg))} encoder x seed variants, {len(todo)} to run")
        if not storage.exists(work.catalog):
            study.copy_catalog(layout.catalog, work.root)
        session = (
            ray_session(cfg.ray_address, cfg.num_cpus, include_dashboard=True) if todo else nullcontext()
        )
        out = versions.version_uri(layout.study, run_id)
        with tracking.run(cfg.mlflow_uri, run_id, dataclasses.asdict(cfg), TRACKING_TAGS) as tracked:
            with session as local:
                for encoder, seed in todo:
                    print(f"study: {encoder}, seed {seed}")
                    variant = {"encoder": encoder, "seed": seed}
                    with tracking.run(cfg.mlflow_uri, f"{encoder}-s{seed}", variant, TRACKING_TAGS) as nested:
                        model_id, seconds = make_encoder(cfg, work, encoder, seed)
                        results, seconds["tune_s"] = evaluate(cfg, work, model_id, bool(local), encoder)
                        rows = study.variant_rows(results, encoder, seed, model_id).assign(**seconds)
                        tracking.log_metrics(nested, seconds)
                    storage.write_parquet(
                        pa.Table.from_pandas(rows, preserve_index=False),
                        study.rows_uri(work.root, encoder, seed),
                    )
            rows = pd.concat(
                [
                    storage.read_parquet([study.rows_uri(work.root, e, s)]).to_pandas()
                    for e, s in study.variants(cfg)
                ]
            )
            facts = study.facts(cfg, run_id, layout.catalog, work.root, rows)
            manifest = study.finish(cfg, run_id, rows, facts)
            log_results(tracked, rows, out)
    return job.done(
        manifest,
        read=f"catalog {layout.catalog}",
        wrote=f"{len(todo)} encoder x seed variants evaluated ({len(study.variants(cfg)) - len(todo)} before); run {run_id}",
        outputs={
            name: storage.join(out, file)
            for name, file in zip(("results", "report", "plot"), study.OUTPUTS, strict=True)
        },
    )


def main(argv: list[str] | None = None) -> versions.Manifest:
    return run(parse(StudyConfig, argv)).result


if __name__ == "__main__":
    main()
