"""pretrain: SemiSupCon contrastive pretraining of a SampleCNN on Ray Train, resumable, multi-worker.

    python -m jobs.pretrain --root data/demo --width 0.25 --num-workers 2 --steps 300

1. Check the config (seconds, before Ray starts), and, when the run has a checkpoint, that only fields a
   resume may change (``RESUMABLE_FIELDS``: ``--steps``, logging, checkpointing, retries) differ from it.
2. Prepare training shards with Ray Data: the catalog's train tracks decoded and resampled once into
   int16 shards under ``<root>/shards``; tracks already in committed shards are skipped, bad ones counted.
3. Train with a Ray Train ``TorchTrainer`` (DDP, projections gathered from every worker), checkpointing
   every ``--checkpoint-every`` steps to ``<root>/runs/<run-name>``. Running the same command again
   resumes from the latest checkpoint; failed workers, and a controller that lost storage, are retried
   from it (``--max-failures``). With ``--min-workers`` the run is elastic: when workers cannot be
   placed again (a node lost), it goes on from the checkpoint with as few as that many, the global batch
   unchanged, and grows back when the cluster does.
4. Export the encoder to ``<root>/models/<model_id>`` with a JSON card, published as the latest model.
With ``--mlflow-uri``, an MLflow run gets the config, the metrics of every logged step and the card.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from typing import Any

import pyarrow.compute as pc
import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer, prepare_model

from musiclib import catalog
from musiclib.core import lifecycle, progress, ray_env, storage, tracking, versions
from musiclib.core.config import Layout, parse
from musiclib.core.ray_env import is_transient_storage_failure, ray_session, retry_transient_storage
from musiclib.train import models
from musiclib.train.data import load_training_data
from musiclib.train.labels import describe_labels, label_facts, plan_labels
from musiclib.train.pretraining import (
    PretrainConfig,
    build,
    check_resume,
    checkpoint_state,
    distributed,
    fit,
    load_checkpoint,
    progress_line,
    restore,
    save_checkpoint,
)
from musiclib.train.shards import (
    committed_shards,
    plan_shards,
    prepare_shard,
    read_shard_columns,
    shard_report,
)

SHARD_RETRIES = 3  # shard tasks run again after storage errors that outlast the decoder's retries
STORAGE_WAIT_S = 10.0  # first wait before a run whose controller lost storage starts again; doubles
TRACKING_TAGS = {"musiclib.job": "pretrain"}


def prepare_shards(cfg: PretrainConfig, layout: Layout) -> dict[str, Any]:
    """Decode the train split into committed shards with Ray Data (one task per shard); return counts."""
    table = catalog.read(layout.catalog, columns=["track_id", "audio_uri", "tags", "split"])
    train = table.filter(pc.equal(table.column("split"), "train"))
    if len(train) == 0:
        raise SystemExit(f"pretrain: the catalog {layout.catalog} has no tracks in the train split")
    done = set(
        read_shard_columns(committed_shards(layout.shards), ["track_id"]).column("track_id").to_pylist()
    )
    groups = plan_shards(train, done, cfg.shard_tracks)
    print(
        f"pretrain: {len(train)} train tracks, {len(done)} already in shards, {len(groups)} shard(s) to prepare"
    )
    if groups:
        kwargs = {
            "shards_uri": layout.shards,
            "base_dir": catalog.base_dir(layout.catalog),
            "max_seconds": cfg.max_track_seconds,
            "segment_seconds": cfg.segment_seconds,
        }
        total = sum(len(group["track_id"]) for group in groups)
        with progress.counting("pretrain: shards", total, "tracks", "tracks") as counter:
            ds = ray.data.from_items(groups, override_num_blocks=len(groups))
            ds.map(lambda group: counted_shard(group, counter, kwargs)).take_all()
    report = shard_report(committed_shards(layout.shards))
    print(f"pretrain: shards ready: {report}")
    if report["usable"] == 0:
        raise SystemExit("pretrain: no usable training track in the shards (see the counts above)")
    return report


def counted_shard(group: dict[str, list], counter: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``prepare_shard`` in a Ray task, its tracks counted on the stage's progress ``counter``."""
    result = prepare_shard(group, **kwargs)
    counter.add.remote({"tracks": len(group["track_id"])})
    return result


def say(line: str) -> None:
    """A progress line from a Train worker, once: Ray Train patches ``print`` to log and echo each line."""
    sys.stdout.write(f"pretrain: {line}\n")
    sys.stdout.flush()


def train_loop(config: dict[str, Any]) -> None:
    """What each Ray Train worker runs: load its share of the shards, resume if asked, train, checkpoint."""
    cfg = PretrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
    progress.quiet_train_worker()
    rank, world = distributed()
    device = ray.train.torch.get_device()
    shard_uris = committed_shards(Layout(cfg.root).shards)
    data = load_training_data(shard_uris, plan_labels(shard_uris, cfg.p_s, cfg.seed), rank, world)
    model, optimizer, augment = build(cfg, device)
    start, trained_s = 0, 0.0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            start, trained_s = restore(model, optimizer, load_checkpoint(directory))
    if rank == 0:
        say(f"worker 0 of {world}: {len(data)} tracks in memory, starting at step {start}")
    ddp_model = prepare_model(model)
    throttle, begun = progress.Throttle(), time.monotonic()

    def report(step: int, metrics: dict[str, float], checkpoint_due: bool) -> None:
        metrics = {**metrics, "start_step": start}
        if rank == 0 and throttle.due(final=step == cfg.steps):
            steps_per_s = (step - start) / (time.monotonic() - begun)  # since this run's start: a steady ETA
            say(f"{progress_line(metrics, cfg.steps)} | ETA {progress.eta(step, cfg.steps, steps_per_s)}")
        if not checkpoint_due:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as directory:
            if rank == 0:
                save_checkpoint(
                    checkpoint_state(model, optimizer, step, cfg, metrics["trained_s"]), directory
                )
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory) if rank == 0 else None)

    fit(ddp_model, optimizer, augment, data, cfg, device, start, report, trained_s)


class MLflowMetrics(ray.train.UserCallback):
    """Rank 0's metrics of every ``ray.train.report``, logged at their step to the pretrain's MLflow run.

    Ray's ``MLflowLoggerCallback`` serves Tune; Ray Train V2 calls a ``UserCallback`` on its controller after
    each report, so the train loop stays free of tracking. A failed request is printed and training goes on.
    """

    def __init__(self, tracked: tracking.Tracked) -> None:
        self.tracked = tracked

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        step = int(metrics[0]["step"])
        try:
            tracking.log_metrics(self.tracked, metrics[0], step)
        except Exception as exc:  # the tracking server is a side channel: a lost request never stops training
            say(f"MLflow did not take the metrics of step {step}: {type(exc).__name__}: {exc}")


def train(cfg: PretrainConfig, layout: Layout, tracked: tracking.Tracked | None = None) -> ray.train.Result:
    """Run (or resume) the Ray Train job named ``cfg.run_name`` under ``<root>/runs``.

    Ray Train retries failed workers itself but not its controller, which fails the run when it cannot
    write its state to storage (an S3 outage). Such a run is started again here, after a wait, and resumes
    from its last registered checkpoint, as the same command would; at most ``--max-failures`` times.
    ``cfg.device`` is the one chosen (``cpu`` or ``gpu``, see ``run``): the checkpoints record it.
    """
    if cfg.device not in ("cpu", "gpu"):
        raise ValueError(f"train needs the chosen device, cpu or gpu, not {cfg.device!r}")
    storage.makedirs(layout.runs)
    restart = 0
    while True:
        try:
            return trainer(cfg, layout, tracked).fit()
        except ray.train.ControllerError as exc:
            restart += 1
            out_of_restarts = cfg.max_failures != -1 and restart > cfg.max_failures
            if out_of_restarts or not is_transient_storage_failure(exc):
                raise
            wait = STORAGE_WAIT_S * 2 ** (restart - 1)
            cause = str(exc.controller_failure).strip().splitlines()[0]
            limit = "no limit" if cfg.max_failures == -1 else cfg.max_failures
            print(
                f"pretrain: Ray Train's controller failed on storage ({cause}); resuming from the last "
                f"checkpoint in {wait:.0f} s (restart {restart} of {limit})"
            )
            time.sleep(wait)


def trainer(cfg: PretrainConfig, layout: Layout, tracked: tracking.Tracked | None = None) -> TorchTrainer:
    """The Ray Train trainer of the run ``cfg.run_name``: the same name and storage resume it; with
    ``tracked``, every report's metrics also go to that MLflow run."""
    fs, path = storage.arrow_filesystem(layout.runs)
    return TorchTrainer(
        train_loop,
        train_loop_config=cfg.as_dict(),
        scaling_config=ScalingConfig(
            num_workers=(cfg.min_workers, cfg.num_workers) if cfg.min_workers else cfg.num_workers,
            use_gpu=cfg.device == "gpu",
            resources_per_worker={"CPU": cfg.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            logging_config=LoggingConfig(log_level=progress.train_log_level()),
            callbacks=[MLflowMetrics(tracked)] if tracked else None,
        ),
    )


def export(
    cfg: PretrainConfig,
    layout: Layout,
    result: ray.train.Result,
    shards: dict[str, Any],
    labels: dict[str, Any],
) -> str:
    """Export the final encoder with its card (config, data, labels used, final metrics); return its id."""
    with result.checkpoint.as_directory() as directory:
        state = load_checkpoint(directory)
    model = models.ContrastiveModel(cfg.encoder_config())
    model.load_state_dict(state["model"])
    card = {
        "run": cfg.run_name,
        "steps": state["step"],
        "pretrain_config": cfg.as_dict(),
        "data": {
            "catalog": layout.catalog,
            "catalog_version": catalog.version(layout.catalog),
            "shards_uri": layout.shards,
            **shards,
        },
        "labels": labels,
        "metrics": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, int | float)},
    }
    return models.export_encoder(model.encoder, layout.models, card)


def run(cfg: PretrainConfig) -> lifecycle.Summary[str]:
    """Prepare the shards, train (or resume) and export the encoder; the summary's result is its model id."""
    job = lifecycle.Job("pretrain", cfg.root)
    layout = Layout(cfg.root, cfg.catalog)
    catalog.validate(layout.catalog)
    run_uri = storage.join(layout.runs, cfg.run_name)
    check_resume(cfg, run_uri)
    torch.manual_seed(cfg.seed)
    with (
        versions.lease(run_uri),
        ray_session(cfg.ray_address, cfg.num_cpus, include_dashboard=True),
        tracking.run(cfg.mlflow_uri, f"pretrain:{cfg.run_name}", cfg.as_dict(), TRACKING_TAGS) as tracked,
    ):
        device = ray_env.cluster_device(cfg.device)
        print(f"pretrain: device {device.reason}")
        cfg = dataclasses.replace(cfg, device=device.name)
        check_resume(cfg, run_uri)  # again, with the device chosen
        with versions.lease(layout.shards), retry_transient_storage(SHARD_RETRIES):
            shards = prepare_shards(cfg, layout)
        labels = label_facts(plan_labels(committed_shards(layout.shards), cfg.p_s, cfg.seed), cfg)
        print(f"pretrain: {describe_labels(labels)}")
        result = train(cfg, layout, tracked)
        model_id = export(cfg, layout, result, shards, labels)
        tracking.log_dict(tracked, models.load_card(layout.models, model_id), "card.json")
    return job.done(
        model_id,
        read=f"{shards['tracks']} train tracks in {shards['shards']} shards, {shards['usable']} usable",
        wrote=f"encoder {model_id} after {(result.metrics or {}).get('step', cfg.steps)} steps "
        f"(device {device.reason})",
        skipped=shards["bad"],
        outputs={"model": storage.join(layout.models, model_id), "run": run_uri},
    )


def main(argv: list[str] | None = None) -> str:
    return run(parse(PretrainConfig, argv)).result


if __name__ == "__main__":
    main()
