"""tune: sweep few-shot linear probes over label budgets with Ray Tune, report what each budget buys.

    python jobs/tune.py --root data/demo [--budgets 1,5,all] [--probes logreg,centroid] ...

One Tune trial is one budget x probe x hyperparameters point, with its normalisations, all tags and all
repetitions inside, because a single fit takes milliseconds (and the normalisations then share support
sets). Embeddings and labels go to the object store once (``tune.with_parameters``); actors are reused.
Each finished configuration writes its rows to ``<run>/trials/<configuration>.parquet``; a restarted
sweep skips configurations already written, so nothing is redone. Every configuration is scored on the
validation split, where all choices are made (each budget's configuration, each tag's cheapest budget, the
final probe set and its thresholds), and on the test split, which only reports the chosen ones.
Outputs under ``<root>/probes/<run_id>/``: results.parquet, report.md, budget_curve.png and
probe_set.safetensors (the full-label configuration chosen on valid, refit on every labeled training
track), then the run is published as a version of the probes dataset (``_latest`` moves last). Running a
complete run again only points ``_latest`` at it (repairing a crash between the manifest and the pointer).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd
import pyarrow as pa
import ray
from ray import tune

from musiclib import catalog, embeddings, fewshot, models, probes, report, storage
from musiclib.config import DEFAULT_ROOT, ConfigError, Layout, parse
from musiclib.ray_env import ray_session


@dataclass
class TuneConfig:
    """Few-shot probe sweep: label budgets x probes x hyperparameters x normalisations, R repetitions each."""

    root: str = DEFAULT_ROOT
    model_id: str = ""  # empty: the latest exported model
    run_id: str = ""  # empty: derived from this config and the inputs, so a restart resumes the same run
    budgets: list[str] = field(default_factory=lambda: ["1", "2", "5", "10", "20", "50", "100", "all"])
    probes: list[str] = field(default_factory=lambda: list(probes.PROBES))
    norms: list[str] = field(default_factory=lambda: list(probes.NORMS))
    tags: list[str] = field(default_factory=list)  # empty: every tag of the training labels
    c_grid: list[float] = field(default_factory=lambda: [0.1, 1.0])  # logreg inverse regularisation
    class_weight: str = "balanced"  # logreg: "balanced" or "none"
    lr_grid: list[float] = field(default_factory=lambda: [0.05])  # linear probe (full-batch Adam)
    weight_decay_grid: list[float] = field(default_factory=lambda: [1e-4])
    epochs: int = 50
    repetitions: int = 5
    seed: int = 0
    head_fraction: float = 0.2
    tolerance: float = 0.02  # per-tag AP distance to the full-label result that counts as "as good"
    target_precision: float | None = None  # thresholds: reach this precision on valid, else max F1
    num_cpus: int = 0  # 0: every core of this machine (local Ray); ignored when joining a cluster
    max_concurrent: int = 0  # 0: one trial per core (local Ray) or per CPU of the cluster

    def validate(self) -> None:
        """Fail fast on a bad budget, probe, normalisation or range, before any data is read or Ray starts."""
        for b in self.budgets:
            try:
                fewshot.parse_budget(b)
            except ValueError as exc:
                raise ConfigError(f"--budgets: {exc}") from exc
        if not self.budgets:
            raise ConfigError("--budgets: give at least one budget")
        for name, values, known in (
            ("probes", self.probes, probes.PROBES),
            ("norms", self.norms, probes.NORMS),
        ):
            unknown = sorted(set(values) - set(known))
            if unknown or not values:
                raise ConfigError(f"--{name}: unknown or empty {unknown}; choose from {', '.join(known)}")
        if self.class_weight not in ("balanced", "none"):
            raise ConfigError("--class-weight: use 'balanced' or 'none'")
        if min(self.c_grid + self.lr_grid, default=0) <= 0 or min(self.weight_decay_grid, default=0) < 0:
            raise ConfigError("--c-grid and --lr-grid must be positive, --weight-decay-grid non-negative")
        if self.repetitions < 1 or self.epochs < 1:
            raise ConfigError("--repetitions and --epochs must be at least 1")
        if self.target_precision is not None and not 0 < self.target_precision <= 1:
            raise ConfigError("--target-precision must be in (0, 1]")


def configurations(cfg: TuneConfig) -> list[dict[str, Any]]:
    """Every point of the grid: budget x probe x normalisation x that probe's hyperparameters."""
    grids: dict[str, list[dict[str, Any]]] = {
        "logreg": [{"C": c, "class_weight": cfg.class_weight} for c in cfg.c_grid],
        "linear": [
            {"lr": lr, "weight_decay": wd, "epochs": cfg.epochs}
            for lr, wd in itertools.product(cfg.lr_grid, cfg.weight_decay_grid)
        ],
        "centroid": [{}],
    }
    out = []
    for budget, probe, norm in itertools.product(cfg.budgets, cfg.probes, cfg.norms):
        for params in grids[probe]:
            if params.get("class_weight") == "none":
                params = {**params, "class_weight": None}
            out.append(
                {
                    "budget": fewshot.budget_name(fewshot.parse_budget(budget)),
                    "probe": probe,
                    "norm": norm,
                    **params,
                }
            )
    return out


def load_data(cfg: TuneConfig, layout: Layout, model_id: str) -> fewshot.ProbeData:
    """Human labels joined with the model's embeddings; an unknown ``--tags`` entry is an error, and so is a
    validation split on which no tag can be scored (configurations are chosen there)."""
    table = catalog.read(layout.catalog, columns=["track_id", "tags", "split"])
    emb = embeddings.read(layout.embeddings, model_id, columns=["track_id", "embedding", "error"])
    data = fewshot.prepare(table, emb, model_id, cfg.head_fraction)
    if cfg.tags:
        unknown = sorted(set(cfg.tags) - set(data.tags))
        if unknown:
            raise ConfigError(
                f"--tags: no training labels for {', '.join(unknown)}; known: {', '.join(data.tags)}"
            )
        keep = [data.tags.index(t) for t in cfg.tags]
        data.y = {s: y[:, keep] for s, y in data.y.items()}
        data.head = [t for t in data.head if t in cfg.tags]
        data.tail = [t for t in data.tail if t in cfg.tags]
        data.tags = list(cfg.tags)
    if len(data.tags) == 0 or len(data.x["train"]) == 0:
        raise ConfigError(f"no labeled training tracks with embeddings of {model_id}: nothing to tune")
    valid = data.y["valid"]
    if not (valid.any(axis=0) & ~valid.all(axis=0)).any():
        raise ConfigError(
            f"no tag has both a positive and a negative among the {len(valid)} labeled validation tracks "
            f"with embeddings of {model_id}: configurations are chosen on the validation split"
        )
    return data


def derive_run_id(cfg: TuneConfig, layout: Layout, model_id: str) -> str:
    """``tune-<digest>`` of the sweep config, the model and the embedding version: same inputs, same run."""
    emb_version = storage.latest_version(embeddings.dataset_uri(layout.embeddings, model_id))
    cat_sum = storage.file_checksum(layout.catalog) if storage.exists(layout.catalog) else ""
    keys = {k: v for k, v in asdict(cfg).items() if k not in ("root", "run_id", "num_cpus", "max_concurrent")}
    blob = json.dumps([keys, model_id, emb_version, cat_sum], sort_keys=True, default=str)
    return "tune-" + hashlib.sha256(blob.encode()).hexdigest()[:10]


def trial_uri(run_dir: str, config: dict[str, Any]) -> str:
    return storage.join(run_dir, "trials", fewshot.trial_key(config) + ".parquet")


LONGEST_FIRST = ("logreg", "linear", "centroid")  # probes by the cost of one trial


def group_by_trial(configs: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """One Tune trial per budget x probe x hyperparameters; its normalisations run inside it.

    A single fit takes milliseconds, so a trial per normalisation would be mostly Tune bookkeeping; inside
    one trial the normalisations are also compared on the very same support sets.
    Trials are ordered longest first (a scikit-learn fit per tag, then one torch fit, then one matrix
    product), so the last trials of a sweep are short and no slot idles long while another finishes.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for config in configs:
        key = fewshot.trial_key({**config, "norm": "*"})
        groups.setdefault(key, []).append(config)
    return sorted(groups.values(), key=lambda group: LONGEST_FIRST.index(group[0]["probe"]))


def run_trial(
    config: dict[str, Any], data: fewshot.ProbeData, repetitions: int, seed: int, run_dir: str
) -> None:
    """The Tune trainable: a few configurations, each on all tags and repetitions; rows written per one."""
    import torch

    torch.set_num_threads(1)
    started_at, start = time.time(), time.perf_counter()
    rows = []
    for trial in config["trial"]:
        trial_rows = fewshot.run_config(data, trial, repetitions, seed)
        storage.write_parquet(pa.Table.from_pylist(trial_rows), trial_uri(run_dir, trial))
        rows += trial_rows
    macro = (
        pd.DataFrame(rows).groupby(["trial", "rep"])[["valid_ap", "test_ap"]].mean().groupby("trial").mean()
    )
    chosen = macro.loc[macro["valid_ap"].idxmax()]  # chosen on valid, as the report chooses
    tune.report(
        {
            "valid_macro_ap": float(chosen["valid_ap"]),
            "test_macro_ap": float(chosen["test_ap"]),
            "compute_s": time.perf_counter() - start,
            "started_at": started_at,
            "ended_at": time.time(),
        }
    )


def trial_slots(cfg: TuneConfig, local: bool, cluster_cpus: int) -> int:
    """Trials at once: ``--max-concurrent``, else one per core of this machine or per CPU of the cluster.

    A local Ray advertises at least 4 logical CPUs (``ray_session``); running 4 trials on 2 cores would
    only time-slice them and start twice the worker processes.
    """
    if cfg.max_concurrent:
        return cfg.max_concurrent
    return max(1, min(cluster_cpus, cfg.num_cpus or os.cpu_count() or 1) if local else cluster_cpus)


def run_sweep(
    cfg: TuneConfig, data: fewshot.ProbeData, run_dir: str, todo: list[dict[str, Any]], slots: int
) -> dict[str, float]:
    """Run the unfinished configurations as Tune trials; return wall time and summed trial compute time."""
    if not todo:
        return {"wall_s": 0.0, "compute_s": 0.0, "slots": 1, "startup_s": 0.0, "steady_overhead": 0.0}
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial, data=data, repetitions=cfg.repetitions, seed=cfg.seed, run_dir=run_dir
        ),
        {"cpu": 1},
    )
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(group_by_trial(todo))},
        tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=slots),
        run_config=tune.RunConfig(
            name=os.path.basename(run_dir),
            storage_path=os.path.join(tempfile.gettempdir(), "musiclib-tune"),
            verbose=0,
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
    steady = 1 - compute / ((last - first) * slots)
    return {
        "wall_s": wall,
        "compute_s": compute,
        "slots": slots,
        "startup_s": first - fit_started,
        "steady_overhead": steady,
    }


def collect(run_dir: str, configs: list[dict[str, Any]]) -> pd.DataFrame:
    """Every configuration's rows, from the per-trial files, as one table."""
    return storage.read_parquet([trial_uri(run_dir, c) for c in configs]).to_pandas()


def finish(
    cfg: TuneConfig, layout: Layout, data: fewshot.ProbeData, run_id: str, results: pd.DataFrame, timing: dict
) -> storage.Manifest:
    """Write results, report, plot and the refit probe set, then publish the run (``_latest`` last).

    The final probe set's configuration is the one chosen on the validation split at the largest budget.
    """
    run_dir = storage.version_uri(layout.probes, run_id)
    summary = report.trial_summary(results)
    best = report.best_per_budget(summary)
    cheapest = report.cheapest_budgets(results, best, cfg.tolerance)
    full = best.iloc[-1]
    final_config = next(c for c in configurations(cfg) if fewshot.trial_key(c) == full["trial"])
    probe_set = fewshot.final_probe_set(data, final_config, cfg.target_precision, cfg.seed)
    probe_set.config = {**probe_set.config, "probe_run_id": run_id}
    overhead = (
        1 - timing["compute_s"] / (timing["wall_s"] * timing["slots"]) if timing["wall_s"] else float("nan")
    )
    facts = {
        "run_id": run_id,
        "model": data.model_id,
        "tags": f"{len(data.tags)} ({len(data.head)} head, {len(data.tail)} tail)",
        "labeled tracks": ", ".join(f"{s} {len(v)}" for s, v in data.x.items()),
        "excluded tracks": f"{len(data.excluded)} " + _excluded_counts(data.excluded),
        **{
            f"tags skipped on {split} (no positive or no negative)": ", ".join(
                sorted(set(results.loc[results[f"{split}_ap"].isna(), "tag"]))
            )
            or "none"
            for split in fewshot.EVAL_SPLITS
        },
        "repetitions": cfg.repetitions,
        "trials": f"{results['trial'].nunique()}",
        "sweep wall time (this session)": f"{timing['wall_s']:.1f} s on {timing['slots']} slots",
        "Tune overhead (1 - trial compute / (wall x slots))": f"{overhead:.1%}, of which start-up "
        f"(workers, imports) {timing['startup_s']:.1f} s; {timing['steady_overhead']:.1%} once trials run",
        "final probe set": f"{full['trial']} (chosen on valid) refit on "
        f"{len(data.x['train'])} labeled training tracks",
    }
    names = ["results.parquet", "report.md", "budget_curve.png", "probe_set.safetensors"]
    uris = [storage.join(run_dir, name) for name in names]
    storage.write_parquet(pa.Table.from_pandas(results, preserve_index=False), uris[0])
    markdown = report.render_markdown(summary, best, cheapest, facts, cfg.tolerance)
    storage.write_bytes(uris[1], markdown.encode())
    report.plot_budget_curve(best, uris[2])
    probe_set.save(uris[3])
    return storage.publish(
        layout.probes,
        run_id,
        uris,
        [len(results), 0, 0, len(data.tags)],
        config=asdict(cfg),
        extra={
            "model_id": data.model_id,
            "best": {k: str(v) for k, v in full.items()},
            **timing,
            "tune_overhead": overhead,
        },
    )


def _excluded_counts(excluded: dict[str, str]) -> str:
    counts = pd.Series(list(excluded.values()), dtype=str).str.split(":").str[0].value_counts()
    return "(" + ", ".join(f"{k}: {v}" for k, v in counts.items()) + ")" if len(counts) else ""


def main(argv: list[str] | None = None) -> storage.Manifest:
    cfg = parse(TuneConfig, argv)
    layout = Layout(cfg.root)
    catalog.validate(layout.catalog)
    model_id = cfg.model_id or models.latest_model(layout.models)
    data = load_data(cfg, layout, model_id)
    run_id = cfg.run_id or derive_run_id(cfg, layout, model_id)
    run_dir = storage.version_uri(layout.probes, run_id)
    with storage.lease(layout.probes):  # one sweep at a time writes the probe runs
        done = storage.read_manifest(layout.probes, run_id)
        if done is not None:
            print(
                f"tune: run {run_id} is already complete: {run_dir}; {storage.make_current(layout.probes, run_id)}"
            )
            return done
        configs = configurations(cfg)
        todo = [c for c in configs if not storage.exists(trial_uri(run_dir, c))]
        print(f"tune: run {run_id}: {len(configs)} configurations, {len(configs) - len(todo)} already done")
        session = (
            ray_session(num_cpus=cfg.num_cpus, log_to_driver=False) if todo else contextlib.nullcontext()
        )
        with session as local:
            slots = trial_slots(cfg, bool(local), int(ray.cluster_resources().get("CPU", 1))) if todo else 1
            timing = run_sweep(cfg, data, run_dir, todo, slots)
        manifest = finish(cfg, layout, data, run_id, collect(run_dir, configs), timing)
    print(f"tune: report {storage.join(run_dir, 'report.md')}")
    print(f"tune: plot {storage.join(run_dir, 'budget_curve.png')}")
    print(f"tune: probe set {storage.join(run_dir, 'probe_set.safetensors')}")
    return manifest


if __name__ == "__main__":
    main()
