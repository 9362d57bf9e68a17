"""tune: sweep few-shot linear probes over label budgets with Ray Tune, report what each budget buys.

    python -m jobs.tune --root data/demo [--budgets 1,5,all] [--probes logreg,centroid] ...

1. Check the config and the catalog, load the labels joined with the model's embeddings (and their log-mel
   statistics: the ``logmel`` and ``fused`` representations), before Ray. Embeddings written before the
   embed job computed the statistics offer the learned embedding alone (one line says so).
2. Under the probes' lease: a run already complete is only made current. Otherwise the configurations
   without a trial file (``musiclib.probe.sweep``) run as Ray Tune trials, one per budget x probe x
   hyperparameters with its representations, normalisations and repetitions inside (a single fit takes
   milliseconds).
   Embeddings and labels go to the object store once (``tune.with_parameters``); actors are reused.
3. Write results.parquet, report.md, budget_curve.png and probe_set.safetensors under
   ``<root>/probes/<run_id>/`` and publish the run (``sweep.finish``; ``_latest`` moves last).
A trial whose worker dies runs again (``--max-failures``); its configurations write the same rows to the
same files. Every choice, the representation included, is made on the validation split; the test split
only reports the chosen configurations. The final probe set records its representation.
With ``--mlflow-uri``, an MLflow run gets the config, each budget's scores and the report, and a nested run
per trial the trial's configurations and scores.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from typing import Any

import ray
from ray import tune

from musiclib import catalog
from musiclib.core import lifecycle, progress, storage, tracking, versions
from musiclib.core.config import Layout, parse
from musiclib.core.ray_env import ray_session
from musiclib.probe import fewshot, sweep
from musiclib.probe.sweep import TuneConfig
from musiclib.train import models

TRACKING_TAGS = {"musiclib.job": "tune"}


def report_trial(
    config: dict[str, Any], data: fewshot.ProbeData, repetitions: int, seed: int, run_dir: str
) -> None:
    """The Tune trainable: runs one trial's configurations (``sweep.run_trial``) and reports them to Tune."""
    import torch

    torch.set_num_threads(1)
    tune.report(sweep.run_trial(config["trial"], data, repetitions, seed, run_dir))


def trial_slots(cfg: TuneConfig, local: bool, cluster_cpus: int) -> int:
    """Trials at once: ``--max-concurrent``, else one per core of this machine or per CPU of the cluster.

    A local Ray advertises at least 4 logical CPUs (``ray_session``); running 4 trials on 2 cores would
    only time-slice them and start twice the worker processes.
    """
    if cfg.max_concurrent:
        return cfg.max_concurrent
    return max(1, min(cluster_cpus, cfg.num_cpus or os.cpu_count() or 1) if local else cluster_cpus)


def run_sweep(
    cfg: TuneConfig,
    data: fewshot.ProbeData,
    run_dir: str,
    todo: list[dict[str, Any]],
    slots: int,
    tracked: tracking.Tracked | None = None,
) -> dict[str, float]:
    """Run the unfinished configurations as Tune trials; return the timings the manifest records. With
    ``tracked``, Ray's ``MLflowLoggerCallback`` logs each trial as a run nested in that MLflow run.

    ``tune_overhead`` is ``1 - trial compute / (wall x slots)``; ``steady_overhead`` the same once the
    first trial runs (``bench/bench_tune.py`` reads them).
    """
    if not todo:
        return {"wall_s": 0.0, "compute_s": 0.0, "slots": 1, "startup_s": 0.0, "steady_overhead": 0.0}
    trainable = tune.with_resources(
        tune.with_parameters(
            report_trial, data=data, repetitions=cfg.repetitions, seed=cfg.seed, run_dir=run_dir
        ),
        {"cpu": 1},
    )
    groups = sweep.group_by_trial(todo)
    callbacks = [progress.tune_callback(len(groups))]
    if tracked is not None:
        from ray.air.integrations.mlflow import MLflowLoggerCallback  # imports mlflow

        tags = {"mlflow.parentRunId": tracked.run_id, **TRACKING_TAGS}
        callbacks.append(MLflowLoggerCallback(tracked.uri, experiment_name=tracking.EXPERIMENT, tags=tags))
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(groups)},
        tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=slots),
        run_config=tune.RunConfig(
            name=os.path.basename(run_dir),
            storage_path=os.path.join(tempfile.gettempdir(), "musiclib-tune"),
            failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
            verbose=0,
            callbacks=callbacks,
        ),
    )
    fit_started, start = time.time(), time.perf_counter()
    results = tuner.fit()
    wall = time.perf_counter() - start
    errors = [r.error for r in results if r.error]
    if errors:
        raise RuntimeError(f"{len(errors)} trial(s) failed; first: {errors[0]}")
    compute = sum(r.metrics["compute_s"] for r in results)
    first = min(r.metrics["started_at"] for r in results)
    last = max(r.metrics["ended_at"] for r in results)
    return {
        "wall_s": wall,
        "compute_s": compute,
        "slots": slots,
        "startup_s": first - fit_started,
        "steady_overhead": 1 - compute / ((last - first) * slots),
    }


def run(cfg: TuneConfig) -> lifecycle.Summary[versions.Manifest]:
    """Run the sweep's unfinished trials on Ray Tune, write the run's outputs and publish it (a run already
    complete is only made current); the summary's result is the run's manifest."""
    job = lifecycle.Job("tune", cfg.root)
    layout = Layout(cfg.root, cfg.catalog)
    catalog.validate(layout.catalog)
    model_id = models.model_id_or_latest(layout.models, cfg.model_id)
    data = sweep.load_data(cfg, layout, model_id)
    cfg = sweep.narrow(cfg, data)
    run_id = sweep.derive_run_id(cfg, layout, model_id)
    run_dir = versions.version_uri(layout.probes, run_id)
    with versions.lease(layout.probes):  # one sweep at a time writes the probe runs
        if (done := job.already_complete(layout.probes, run_id)) is not None:
            return done
        configs = sweep.configurations(cfg)
        todo = [c for c in configs if not storage.exists(sweep.trial_uri(run_dir, c))]
        print(f"tune: run {run_id}: {len(configs)} configurations, {len(configs) - len(todo)} already done")
        tags = {**TRACKING_TAGS, "musiclib.model_id": model_id}
        with tracking.run(cfg.mlflow_uri, run_id, asdict(cfg), tags) as tracked:
            session = ray_session(cfg.ray_address, cfg.num_cpus) if todo else contextlib.nullcontext()
            with session as local:
                slots = (
                    trial_slots(cfg, bool(local), int(ray.cluster_resources().get("CPU", 1))) if todo else 1
                )
                timing = run_sweep(cfg, data, run_dir, todo, slots, tracked)
            overhead = (
                1 - timing["compute_s"] / (timing["wall_s"] * timing["slots"])
                if timing["wall_s"]
                else float("nan")
            )
            results = sweep.collect(run_dir, configs)
            manifest = sweep.finish(cfg, layout, data, run_id, results, {**timing, "tune_overhead": overhead})
            tracking.log_metrics(
                tracked, {**sweep.budget_metrics(results), **timing, "tune_overhead": overhead}
            )
            tracking.log_files(tracked, [storage.join(run_dir, name) for name in sweep.OUTPUTS[1:3]])
    files = (storage.join(run_dir, name) for name in sweep.OUTPUTS[1:])  # all but results.parquet
    return job.done(
        manifest,
        read=f"{sum(len(x) for x in data.x.values())} labeled tracks "
        f"({', '.join(f'{s} {len(x)}' for s, x in data.x.items())}), {len(data.tags)} tags, embeddings of {model_id}",
        wrote=f"{len(configs)} configurations ({len(configs) - len(todo)} done before) x {cfg.repetitions} "
        f"repetitions; run {run_id}",
        skipped=Counter(data.excluded.values()),
        outputs=dict(zip(("report", "plot", "probes"), files, strict=True)),
    )


def main(argv: list[str] | None = None) -> versions.Manifest:
    return run(parse(TuneConfig, argv)).result


if __name__ == "__main__":
    main()
