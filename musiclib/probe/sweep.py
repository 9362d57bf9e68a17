"""The tune stage without Ray: the sweep's config, its grid of trials, the run id, and the run's outputs.

A sweep is budgets x probes x hyperparameters x representations x normalisations (``configurations``), run
as one trial per budget x probe x hyperparameters with its representations and normalisations inside
(``group_by_trial``, ``run_trial``). The representation is what the probes read (``REPRESENTATIONS`` of
the embeddings table): the learned embedding, the log-mel statistics, or both side by side (``fused``,
always with the ``standardize`` normalisation, whatever ``--norms`` lists: its parts are standardised and
weighted to equal total variance, ``probes.fit_normalizer``); it is chosen per budget on the validation split like every other
setting. Embeddings without the ``logmel`` column offer only the learned embedding (``narrow``). Each
configuration's rows go to ``<run>/trials/<configuration>.parquet``, so a restarted sweep skips what is
written. ``finish`` turns the rows into the run's outputs (results, report, budget curve, the refit probe
set) and publishes the run as a version of ``<root>/probes``. ``jobs/tune.py`` runs the trials on Ray Tune.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import pandas as pd
import pyarrow as pa

from musiclib import audio, catalog
from musiclib.core import storage, tracking, versions
from musiclib.core.config import DEFAULT_ROOT, ConfigError, Layout, RayConfig, check
from musiclib.embed import table as embeddings_table
from musiclib.probe import fewshot, probes, report

LONGEST_FIRST = ("logreg", "linear", "centroid")  # probes by the cost of one trial
OUTPUTS = ("results.parquet", "report.md", "budget_curve.png", "probe_set.safetensors")


@dataclass
class TuneConfig(RayConfig):
    """Few-shot probe sweep: label budgets x probes x hyperparameters x representations x normalisations, R
    repetitions each."""

    root: str = DEFAULT_ROOT
    catalog: str = ""  # the track catalog (musiclib.catalog); empty: <root>/catalog/tracks.parquet
    model_id: str = ""  # empty: the latest exported model
    run_id: str = ""  # empty: derived from this config and the inputs, so a restart resumes the same run
    # labeled positives per tag (all: every one)
    budgets: list[str] = field(default_factory=lambda: ["1", "2", "5", "10", "20", "50", "100", "all"])
    probes: list[str] = field(default_factory=lambda: list(probes.PROBES))  # logreg, linear, centroid
    # normalisations of embedding and logmel
    norms: list[str] = field(default_factory=lambda: list(probes.NORMS))
    # what the probes read; --norms apply to embedding and logmel, fused is always standardised (its parts
    # must be); those the embeddings cannot give (no logmel column: written before embed computed it) are
    # left out
    representations: list[str] = field(default_factory=lambda: ["embedding", "fused"])
    tags: list[str] = field(default_factory=list)  # empty: every tag of the training labels
    c_grid: list[float] = field(default_factory=lambda: [0.1, 1.0])  # logreg inverse regularisation
    class_weight: str = "balanced"  # logreg: "balanced" or "none"
    lr_grid: list[float] = field(default_factory=lambda: [0.05])  # linear probe (full-batch Adam)
    weight_decay_grid: list[float] = field(default_factory=lambda: [1e-4])  # linear probe
    epochs: int = 50  # linear probe: full-batch epochs
    repetitions: int = 5  # support sets drawn per budget (each a repetition)
    seed: int = 0  # the support sets' draws
    head_fraction: float = 0.2  # share of the tags, most frequent first, reported as head (the rest: tail)
    tolerance: float = 0.02  # per-tag AP distance to the full-label result that counts as "as good"
    target_precision: float | None = None  # thresholds: reach this precision on valid, else max F1
    max_concurrent: int = 0  # 0: one trial per core (local Ray) or per CPU of the cluster
    max_failures: int = 3  # times a trial whose worker died runs again (-1: without limit)
    mlflow_uri: str = ""  # MLflow tracking: the sweep's config and outputs, a run per trial (empty: none)

    def validate(self) -> None:
        """Fail fast on a bad budget, probe, normalisation or range, before any data is read or Ray starts."""
        problems = RayConfig.problems(self) + tracking.problems(self.mlflow_uri)
        for b in self.budgets:
            try:
                fewshot.parse_budget(b)
            except ValueError as exc:
                problems.append(f"--budgets: {exc}")
        if not self.budgets:
            problems.append("--budgets: give at least one budget")
        for name, values, known in (
            ("probes", self.probes, probes.PROBES),
            ("norms", self.norms, probes.NORMS),
            ("representations", self.representations, embeddings_table.REPRESENTATIONS),
        ):
            unknown = sorted(set(values) - set(known))
            if unknown or not values:
                problems.append(f"--{name}: unknown or empty {unknown}; choose from {', '.join(known)}")
        if self.class_weight not in ("balanced", "none"):
            problems.append("--class-weight: use 'balanced' or 'none'")
        if min(self.c_grid + self.lr_grid, default=0) <= 0 or min(self.weight_decay_grid, default=0) < 0:
            problems.append("--c-grid and --lr-grid must be positive, --weight-decay-grid non-negative")
        if self.repetitions < 1 or self.epochs < 1:
            problems.append("--repetitions and --epochs must be at least 1")
        if self.target_precision is not None and not 0 < self.target_precision <= 1:
            problems.append("--target-precision must be in (0, 1]")
        if self.max_concurrent < 0:
            problems.append("--max-concurrent must not be negative (0: automatic)")
        if self.max_failures < -1:
            problems.append("--max-failures must be -1 (without limit) or at least 0")
        check("tune", problems)


def configurations(cfg: TuneConfig) -> list[dict[str, Any]]:
    """Every point of the grid: budget x probe x representation x normalisation x that probe's
    hyperparameters; ``fused`` takes ``standardize`` whatever ``--norms`` lists (its parts must be
    standardised to weigh them, ``probes.fit_normalizer``)."""
    grids: dict[str, list[dict[str, Any]]] = {
        "logreg": [{"C": c, "class_weight": cfg.class_weight} for c in cfg.c_grid],
        "linear": [
            {"lr": lr, "weight_decay": wd, "epochs": cfg.epochs}
            for lr, wd in itertools.product(cfg.lr_grid, cfg.weight_decay_grid)
        ],
        "centroid": [{}],
    }
    out = []
    grid = itertools.product(cfg.budgets, cfg.probes, cfg.representations)
    for budget, probe, representation in grid:
        norms = ["standardize"] if representation == "fused" else cfg.norms
        for norm, params in itertools.product(norms, grids[probe]):
            if params.get("class_weight") == "none":
                params = {**params, "class_weight": None}
            out.append(
                {
                    "budget": fewshot.budget_name(fewshot.parse_budget(budget)),
                    "probe": probe,
                    "representation": representation,
                    "norm": norm,
                    **params,
                }
            )
    return out


def group_by_trial(configs: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """One Tune trial per budget x probe x hyperparameters; its representations and normalisations run
    inside it.

    A single fit takes milliseconds, so a trial per normalisation would be mostly Tune bookkeeping; inside
    one trial the representations and normalisations are also compared on the very same support sets.
    Trials are ordered longest first (a scikit-learn fit per tag, then one torch fit, then one matrix
    product), so the last trials of a sweep are short and no slot idles long while another finishes.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for config in configs:
        key = fewshot.trial_key({**config, "representation": "*", "norm": "*"})
        groups.setdefault(key, []).append(config)
    return sorted(groups.values(), key=lambda group: LONGEST_FIRST.index(group[0]["probe"]))


def trial_uri(run_dir: str, config: dict[str, Any]) -> str:
    return storage.join(run_dir, "trials", fewshot.trial_key(config) + ".parquet")


def run_trial(
    trial: list[dict[str, Any]], data: fewshot.ProbeData, repetitions: int, seed: int, run_dir: str
) -> dict[str, float]:
    """A trial's configurations, each on all tags and repetitions, rows written per configuration.

    Returns the macro AP of the configuration chosen on valid (as the report chooses) and the trial's
    timings, which the job reports to Ray Tune.
    """
    started_at, start = time.time(), time.perf_counter()
    rows = []
    for config in trial:
        config_rows = fewshot.run_config(data, config, repetitions, seed)
        storage.write_parquet(pa.Table.from_pylist(config_rows), trial_uri(run_dir, config))
        rows += config_rows
    macro = (
        pd.DataFrame(rows).groupby(["trial", "rep"])[["valid_ap", "test_ap"]].mean().groupby("trial").mean()
    )
    chosen = macro.loc[macro["valid_ap"].idxmax()]
    return {
        "valid_macro_ap": float(chosen["valid_ap"]),
        "test_macro_ap": float(chosen["test_ap"]),
        "compute_s": time.perf_counter() - start,
        "started_at": started_at,
        "ended_at": time.time(),
    }


def load_data(cfg: TuneConfig, layout: Layout, model_id: str) -> fewshot.ProbeData:
    """Human labels joined with the model's embeddings (and their log-mel statistics, when a representation
    asked for needs them and the table has them); an unknown ``--tags`` entry is an error, and so is a
    validation split on which no tag can be scored (configurations are chosen there)."""
    table = catalog.read(layout.catalog, columns=["track_id", "tags", "split"])
    offered = embeddings_table.offered(embeddings_table.files(layout.embeddings, model_id))
    wanted = [r for r in cfg.representations if r != "embedding" and r in offered]
    columns = embeddings_table.columns("fused" if wanted else "embedding")
    emb = embeddings_table.read(layout.embeddings, model_id, columns=columns)
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


def narrow(cfg: TuneConfig, data: fewshot.ProbeData) -> TuneConfig:
    """The config with only the representations ``data`` offers, saying in one line which were left out
    (embeddings without the ``logmel`` column); a ``ConfigError`` when none is left."""
    kept = [r for r in cfg.representations if r in data.representations]
    left_out = [r for r in cfg.representations if r not in kept]
    if left_out:
        print(
            f"tune: the embeddings of {data.model_id} have no logmel column (written before the embed job "
            f"computed it): {', '.join(left_out)} not offered; embed with --only-new false to add it"
        )
    if not kept:
        raise ConfigError(
            f"--representations {','.join(cfg.representations)}: none offered by these embeddings"
        )
    return replace(cfg, representations=kept)


def derive_run_id(cfg: TuneConfig, layout: Layout, model_id: str) -> str:
    """``--run-id``, else ``tune-<digest>`` of the sweep config, the model, the embedding version and the
    catalog's version (``catalog.version``): same inputs, same run."""
    if cfg.run_id:
        return cfg.run_id
    emb_version = versions.latest_version(embeddings_table.dataset_uri(layout.embeddings, model_id))
    # the catalog counts by its version identity, not by where it is named
    operational = ("root", "catalog", "run_id", "ray_address", "num_cpus", "max_concurrent", "max_failures")
    operational += ("mlflow_uri",)
    keys = {k: v for k, v in asdict(cfg).items() if k not in operational}
    return versions.digest_version("tune", [keys, model_id, emb_version, catalog.version(layout.catalog)])


def budget_metrics(results: pd.DataFrame) -> dict[str, float]:
    """Each budget's configuration chosen on valid: its macro scores over all tags, on both splits, as tracked
    metrics ``<split>_<metric>_all/budget_<budget>`` (mean over repetitions)."""
    best = report.best_per_budget(report.trial_summary(results))
    columns = [c for c in best.columns if c.endswith("_all_mean")]
    return {
        f"{c.removesuffix('_mean')}/budget_{row['budget']}": float(row[c])
        for _, row in best.iterrows()
        for c in columns
    }


def collect(run_dir: str, configs: list[dict[str, Any]]) -> pd.DataFrame:
    """Every configuration's rows, from the per-trial files, as one table."""
    return storage.read_parquet([trial_uri(run_dir, c) for c in configs]).to_pandas()


def facts(cfg: TuneConfig, data: fewshot.ProbeData, run_id: str, results: pd.DataFrame, final: str) -> dict:
    """The report's facts: the run, the data it used and left out, and the final probe set."""
    excluded = audio.count_reasons(data.excluded.values()).most_common()
    return {
        "run_id": run_id,
        "model": data.model_id,
        "tags": f"{len(data.tags)} ({len(data.head)} head, {len(data.tail)} tail)",
        "labeled tracks": ", ".join(f"{s} {len(v)}" for s, v in data.x.items()),
        "excluded tracks": f"{len(data.excluded)} "
        + ("(" + ", ".join(f"{k}: {v}" for k, v in excluded) + ")" if excluded else ""),
        **{
            f"tags skipped on {split} (no positive or no negative)": ", ".join(
                sorted(set(results.loc[results[f"{split}_ap"].isna(), "tag"]))
            )
            or "none"
            for split in fewshot.EVAL_SPLITS
        },
        "representations": ", ".join(cfg.representations),
        "repetitions": cfg.repetitions,
        "trials": f"{results['trial'].nunique()}",
        "final probe set": f"{final} (chosen on valid) refit on {len(data.x['train'])} labeled training tracks",
    }


def finish(
    cfg: TuneConfig,
    layout: Layout,
    data: fewshot.ProbeData,
    run_id: str,
    results: pd.DataFrame,
    extra: dict[str, Any],
) -> versions.Manifest:
    """Write results, report, plot and the refit probe set, then publish the run (``_latest`` last).

    The final probe set's configuration is the one chosen on the validation split at the largest budget.
    ``extra`` (the sweep's timings) goes to the manifest only, not to the report.
    """
    run_dir = versions.version_uri(layout.probes, run_id)
    summary = report.trial_summary(results)
    best = report.best_per_budget(summary)
    cheapest = report.cheapest_budgets(results, best, cfg.tolerance)
    full = best.iloc[-1]
    final_config = next(c for c in configurations(cfg) if fewshot.trial_key(c) == full["trial"])
    probe_set = fewshot.final_probe_set(data, final_config, cfg.target_precision, cfg.seed)
    probe_set.config = {**probe_set.config, "probe_run_id": run_id}
    uris = [storage.join(run_dir, name) for name in OUTPUTS]
    storage.write_parquet(pa.Table.from_pandas(results, preserve_index=False), uris[0])
    lines = facts(cfg, data, run_id, results, full["trial"])
    storage.write_bytes(
        uris[1], report.render_markdown(summary, best, cheapest, lines, cfg.tolerance).encode()
    )
    report.plot_budget_curve(best, uris[2], cfg.repetitions)
    probe_set.save(uris[3])
    return versions.publish(
        layout.probes,
        run_id,
        uris,
        [len(results), 0, 0, len(data.tags)],
        config=asdict(cfg),
        extra={"model_id": data.model_id, "best": {k: str(v) for k, v in full.items()}, **extra},
    )
