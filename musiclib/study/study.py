"""The encoder study without Ray: its config, the encoders compared, the results table, study.md, study.png.

Every trained encoder has the same architecture, data, steps, batch size and seeds and differs only in
the labels pretraining sees (``label_settings``): CLMR (none), SemiSupCon with a share of them or all of
them, supervised contrastive on the labeled clips alone. Two untrained references bound them: the randomly
initialised encoder (each seed's initial weights, those the trained ones start from) and a hand-crafted
floor (``musiclib.embed.logmel``). Each is embedded by the embed stage and evaluated by the tune job's few-shot
protocol; ``variant_rows`` keeps, per budget, the configuration chosen on the validation split and its
per-repetition macro scores; ``summarize`` pools seeds and repetitions and compares every encoder with a
reference. ``jobs/study.py`` runs the chain, calling the jobs' ``run`` with the configs built here
(``pretrain_config``, ``embed_config``, ``tune_config``); outputs go to ``<root>/study/<run_id>/``.

    python -m musiclib.study.study study-runs [--root ROOT] [--budget 20]   # every run of a root, side by side
    python -m musiclib.study.study study-plot OUT.png [--root ROOT] [--run-id RUN]   # a run's study.png
"""

from __future__ import annotations

import dataclasses
import io
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402

from musiclib import catalog  # noqa: E402
from musiclib.core import storage, tracking, versions
from musiclib.core.config import (  # noqa: E402
    DEFAULT_ROOT,
    ConfigError,
    Layout,
    RayConfig,
    build,
    check,
    overrides,
    take_flags,
)
from musiclib.embed.embedder import EmbedConfig  # noqa: E402
from musiclib.probe import report
from musiclib.probe.sweep import TuneConfig  # noqa: E402
from musiclib.train.pretraining import PretrainConfig  # noqa: E402

T = TypeVar("T")

ENCODERS = {
    "clmr": "CLMR: self-supervised only, no labels (p_s = 0)",
    "semisupcon-low": "SemiSupCon with a share of the labels (p_s = --label-share, b_s = --batch-label-share)",
    "semisupcon-all": "SemiSupCon with all labels (p_s = 1, b_s = --batch-label-share)",
    "supervised": "supervised contrastive on the labeled clips alone (p_s = 1, b_s = 1)",
    "random": "no training: the randomly initialised encoder (the first seed's initial weights)",
    "logmel": "hand-crafted floor: mean and std of each log-mel band over the track",
    "fused": "semisupcon-low's embedding beside the log-mel statistics, each standardised (tune's fused)",
}
TRAINED = ("clmr", "semisupcon-low", "semisupcon-all", "supervised")
FUSED_WITH = "semisupcon-low"  # the trained encoder whose embeddings the fused variant reads, seed by seed
# what each variant's probes read (the tune job's representations); every other encoder: its embedding
REPRESENTATION = {"logmel": "logmel", "fused": "fused"}
REFERENCE = "clmr"  # every other encoder's difference is taken from this one when it is in the study
OUTPUTS = ("results.parquet", "study.md", "study.png")
METRIC_NAMES = {"ap": "average precision (AP)", "roc_auc": "ROC-AUC"}
# Options the study sets itself, per job: they may not appear in that job's pass-through options.
SET_BY_STUDY = {
    "pretrain": {
        "root",
        "catalog",
        "run_name",
        "seed",
        "p_s",
        "b_s",
        "encoder",
        "width",
        "minutes",
        "steps",
        "batch_size",
        "mlflow_uri",
    },
    "embed": {"root", "catalog", "model_id", "max_chunks", "only_new"},
    "tune": {"root", "catalog", "model_id", "run_id", "representations", "mlflow_uri"},
}


@dataclass
class StudyConfig(RayConfig):
    """Compare encoders trained with no, few and all labels (and two untrained references) by few-shot probes.

    Every trained encoder of a study is of one family (``--encoder``) and trains for the same time
    (``--minutes``, at most ``--steps``): encoders are compared at equal compute. The defaults fit a
    developer's machine (2 CPU cores, docs/STUDY.md); a GPU cluster scales the same study with ``--width 1
    --minutes 0 --steps 10000 --batch-size 96`` and ``--pretrain-options "--num-workers 8 --device gpu"``
    (any option of the pretrain, embed and tune jobs passes through).
    """

    root: str = DEFAULT_ROOT
    catalog: str = ""  # the track catalog (musiclib.catalog); empty: <root>/catalog/tracks.parquet
    run_id: str = ""  # empty: derived from this config and the catalog, so a restart resumes the same run
    encoders: list[str] = field(default_factory=lambda: list(ENCODERS))  # the variants compared
    seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2]
    )  # pretraining seeds (untrained references: the first)
    label_share: float = 0.1  # p_s of semisupcon-low: the share of the labeled tracks whose labels it sees
    batch_label_share: float = PretrainConfig.b_s  # b_s of both SemiSupCon encoders: labeled clips per batch
    encoder: str = "melcnn"  # the family of every trained encoder and of the random one (samplecnn, melcnn)
    width: float = 0.25  # channel multiplier of every encoder
    # training time of each pretraining (0: --steps alone); sized to the 90-minute target (STUDY.md)
    minutes: float = 3.0
    steps: int = 2000  # at most this many steps each
    batch_size: int = 64  # pretraining clips per step
    max_chunks: int = 2  # chunks of 2.7 s embedded per track, spread over it
    # one worker with both cores (what two synchronised workers compute, faster on 2 cores: BENCHMARKS.md);
    # labeled clips are positives when they share 3 tags (chosen on validation: docs/STUDY.md)
    pretrain_options: str = (
        "--num-workers 1 --cpus-per-worker 2 --lr 1e-3 --warmup 10 --cosine true --p-chain 0 --p-pitch 0 "
        "--label-threshold 3 --log-every 20"
    )
    embed_options: str = ""  # more options of the embed job, as on its command line
    # every budget, normalisation and repetition of the tune job; its all-tags linear probe and centroids
    # (per-tag scikit-learn fits, --probes logreg, cost minutes per sweep on thousands of labeled tracks)
    tune_options: str = "--probes linear,centroid"
    # MLflow tracking: the study's run, a nested run per encoder and seed holding its pretrain and tune runs
    mlflow_uri: str = ""

    def validate(self) -> None:
        """List every problem at once, the pass-through options checked by their own jobs' configs."""
        problems = RayConfig.problems(self) + tracking.problems(self.mlflow_uri)
        unknown = [e for e in self.encoders if e not in ENCODERS]
        if unknown or not self.encoders:
            problems.append(f"--encoders: unknown or empty {unknown}; choose from {', '.join(ENCODERS)}")
        elif "fused" in self.encoders and FUSED_WITH not in self.encoders[: self.encoders.index("fused")]:
            problems.append(f"--encoders: fused reads {FUSED_WITH}'s embeddings: list {FUSED_WITH} before it")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds, default=0) < 0:
            problems.append(f"--seeds {self.seeds}: give one or more distinct non-negative seeds")
        if not 0.0 < self.label_share < 1.0:
            problems.append(f"--label-share {self.label_share} must be in (0, 1) (p_s = 1 is semisupcon-all)")
        if not 0.0 < self.batch_label_share < 1.0:
            problems.append(
                f"--batch-label-share {self.batch_label_share} must be in (0, 1) (b_s = 1 is supervised)"
            )
        if self.max_chunks < 1:
            problems.append(f"--max-chunks must be at least 1, got {self.max_chunks}")
        untracked = dataclasses.replace(self, mlflow_uri="")  # its URI's problems are listed once, above
        for job, cls, make in (
            ("pretrain", PretrainConfig, lambda: pretrain_config(untracked, self.root, "clmr", 0)),
            ("embed", EmbedConfig, None),
            ("tune", TuneConfig, lambda: tune_config(untracked, self.root, "", local=False)),
        ):
            problems += option_problems(job, cls, getattr(self, f"{job}_options"), make)
        try:
            catalog.files(Layout(self.root, self.catalog).catalog)
        except catalog.CatalogError as exc:
            problems.append(str(exc))
        check("study", problems)


def options(text: str) -> list[str]:
    """A pass-through option string as arguments (shell quoting rules)."""
    return shlex.split(text)


def option_problems(job: str, cls: type, text: str, make: Callable[[], Any] | None) -> list[str]:
    """What is wrong with one job's pass-through options: unreadable, unknown, set by the study, or (given
    ``make``, which builds the job's config as a run does) refused by the job's own ``validate``."""
    flag = f"--{job}-options"
    try:
        args = options(text)
    except ValueError as exc:
        return [f"{flag}: {exc}"]
    names = {a[2:].partition("=")[0].replace("-", "_") for a in args if a.startswith("--")}
    fields = {f.name for f in dataclasses.fields(cls)}
    problems = [f"{flag}: --{n.replace('_', '-')} is not a {job} option" for n in sorted(names - fields)]
    problems += [
        f"{flag}: --{n.replace('_', '-')} is set by the study" for n in sorted(names & SET_BY_STUDY[job])
    ]
    if make is not None and not names - fields:
        try:
            make()
        except ConfigError as exc:
            problems.append(f"the {job} job refuses the study's settings with {flag}: {exc}")
    return problems


def label_settings(cfg: StudyConfig, encoder: str) -> tuple[float, float]:
    """``(p_s, b_s)`` of a trained encoder: which labels pretraining keeps, the labeled share of a batch."""
    return {
        "clmr": (0.0, 0.0),
        "semisupcon-low": (cfg.label_share, cfg.batch_label_share),
        "semisupcon-all": (1.0, cfg.batch_label_share),
        "supervised": (1.0, 1.0),
    }[encoder]


def variants(cfg: StudyConfig) -> list[tuple[str, int]]:
    """Every (encoder, seed) the study evaluates: the trained ones (and the fused representation of one of
    them) with every seed, the two untrained references once (the first seed), their spread is that of
    the probes' repetitions alone."""
    seeded = (*TRAINED, "fused")
    return [(e, s) for e in cfg.encoders for s in (cfg.seeds if e in seeded else cfg.seeds[:1])]


def job_config(cls: type[T], text: str, **settings: Any) -> T:
    """A job's config: the study's ``settings``, then the job's pass-through options ``text`` (the study's
    own are refused before, ``SET_BY_STUDY``), checked by the job's ``validate`` as its command line is."""
    return build(cls, {**settings, **overrides(cls, options(text))})


def pretrain_config(cfg: StudyConfig, work_root: str, encoder: str, seed: int) -> PretrainConfig:
    """The pretrain job's config for one trained encoder and seed (its run named after both)."""
    p_s, b_s = label_settings(cfg, encoder)
    return job_config(
        PretrainConfig,
        cfg.pretrain_options,
        root=work_root,
        run_name=f"study-{encoder}-s{seed}",
        seed=seed,
        p_s=p_s,
        b_s=b_s,
        encoder=cfg.encoder,
        width=cfg.width,
        minutes=cfg.minutes,
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        mlflow_uri=cfg.mlflow_uri,
    )


def embed_config(cfg: StudyConfig, work_root: str, model_id: str) -> EmbedConfig:
    """The embed job's config: the labeled tracks only (the probes use no other embedding)."""
    return job_config(
        EmbedConfig,
        cfg.embed_options,
        root=work_root,
        catalog=labeled_catalog(work_root),
        model_id=model_id,
        max_chunks=cfg.max_chunks,
    )


def tune_config(
    cfg: StudyConfig, work_root: str, model_id: str, local: bool, encoder: str = "clmr"
) -> TuneConfig:
    """The tune job's config on one model's embeddings, read as the ``encoder`` variant reads them (its
    ``REPRESENTATION``). In a ``local`` Ray the study started (at least 4 logical CPUs), one trial per core,
    as the tune job takes when it starts Ray itself; on a cluster, or with ``--max-concurrent`` in the tune
    options, those decide."""
    slots = {"max_concurrent": cfg.num_cpus or os.cpu_count() or 1} if local else {}
    representation = REPRESENTATION.get(encoder, "embedding")
    return job_config(
        TuneConfig,
        cfg.tune_options,
        root=work_root,
        model_id=model_id,
        representations=[representation],
        mlflow_uri=cfg.mlflow_uri,
        **slots,
    )


# --------------------------------------------------------------------------- where things go


def work_root(root: str, run_id: str) -> str:
    """The root the study's jobs run under: its own shards, runs, models, embeddings and probe runs, so
    nothing of the catalog's own pipeline (its latest model, its summaries) changes."""
    return storage.join(versions.version_uri(Layout(root).study, run_id), "work")


def labeled_catalog(work: str) -> str:
    """The work catalog's labeled tracks: what the encoders embed."""
    return storage.join(work, "catalog", "labeled.parquet")


def rows_uri(work: str, encoder: str, seed: int) -> str:
    """One evaluated (encoder, seed): a restarted study skips those whose rows are written."""
    return storage.join(work, "rows", f"{encoder}-s{seed}.parquet")


def derive_run_id(cfg: StudyConfig, layout: Layout) -> str:
    """``--run-id``, else ``study-<digest>`` of the config and the catalog: the same study names the same
    run."""
    if cfg.run_id:
        return cfg.run_id
    keys = {
        k: v
        for k, v in dataclasses.asdict(cfg).items()
        if k not in ("root", "catalog", "run_id", "ray_address", "num_cpus", "mlflow_uri")
    }
    return versions.digest_version("study", [keys, catalog.version(layout.catalog)])


def copy_catalog(source: str, work: str) -> None:
    """Write the catalog under the work root with every relative ``audio_uri`` made absolute (same audio),
    and its labeled tracks beside it (``labeled_catalog``)."""
    table = catalog.read(source)
    base = catalog.base_dir(source)

    def absolute(uri: Any) -> Any:
        try:
            return storage.resolve(base, uri) if isinstance(uri, str) and uri.strip() else uri
        except storage.StorageError:
            return uri  # a bad URI stays as it is: the jobs give that track its reason

    uris = [absolute(u) for u in table["audio_uri"].to_pylist()]
    table = table.set_column(table.column_names.index("audio_uri"), "audio_uri", pa.array(uris, pa.string()))
    catalog.write(catalog.labeled(table), labeled_catalog(work))
    catalog.write(table, Layout(work).catalog)


# --------------------------------------------------------------------------- results


def variant_rows(results: pd.DataFrame, encoder: str, seed: int, model_id: str) -> pd.DataFrame:
    """One (encoder, seed)'s rows: per budget, the configuration chosen on the validation split
    (``report.best_per_budget``) and its macro scores in every repetition, by split, metric and tag group.

    ``results`` is a tune run's ``results.parquet`` (one row per configuration, repetition and tag).
    """
    best = report.best_per_budget(report.trial_summary(results))
    chosen = results[results["trial"].isin(best["trial"])]
    columns = [f"{split}_{metric}" for split in report.SPLITS for metric in report.METRICS]
    per_group = []
    for group in report.GROUPS:
        rows = chosen if group == "all" else chosen[chosen["group"] == group]
        per_group.append(rows.groupby(["trial", "rep"])[columns].mean().add_suffix(f"_{group}"))
    macro = pd.concat(per_group, axis=1).reset_index()
    info = chosen.groupby("trial")[["budget"]].first().join(chosen.groupby("trial")["n_support"].mean())
    out = info.reset_index().merge(macro, on="trial")
    out.insert(0, "encoder", encoder)
    out.insert(1, "seed", seed)
    out.insert(2, "model_id", model_id)
    out["n_head_tags"] = chosen.loc[chosen["group"] == "head", "tag"].nunique()
    out["n_tail_tags"] = chosen.loc[chosen["group"] == "tail", "tag"].nunique()
    order = out["budget"].map(report.budget_order)
    return (
        out.assign(_order=order).sort_values(["_order", "rep"]).drop(columns="_order").reset_index(drop=True)
    )


def summarize(rows: pd.DataFrame, reference: str = REFERENCE) -> pd.DataFrame:
    """Test scores per encoder, budget, metric and tag group: mean and spread (standard deviation over every
    seed and repetition), and the difference from ``reference`` with whether it exceeds the spread of a
    difference, ``sqrt(std^2 + std_ref^2)``. Never where a side has no spread: a single value, or the same
    value every time (one seed at a budget whose support set is the whole labeled pool)."""
    long = rows.melt(
        id_vars=["encoder", "seed", "rep", "budget"],
        value_vars=[f"test_{m}_{g}" for m in report.METRICS for g in report.GROUPS],
        var_name="column",
    )
    long[["metric", "group"]] = long["column"].str.removeprefix("test_").str.rsplit("_", n=1, expand=True)
    stats = long.groupby(["encoder", "budget", "metric", "group"])["value"].agg(["mean", "std", "count"])
    stats = stats.reset_index()  # one value (a single run at budget "all"): no spread, nan
    if reference in set(stats["encoder"]):
        keys = ["budget", "metric", "group"]
        ref = stats.loc[stats["encoder"] == reference, [*keys, "mean", "std"]]
        joined = stats.merge(ref, on=keys, how="left", suffixes=("", "_ref"))
        stats["delta"] = joined["mean"] - joined["mean_ref"]
        measured = (joined["std"] > 0) & (joined["std_ref"] > 0)
        stats["beyond_spread"] = measured & (
            stats["delta"].abs() > np.hypot(joined["std"], joined["std_ref"])
        )
    else:
        stats["delta"], stats["beyond_spread"] = np.nan, False
    return stats


def summary_metrics(rows: pd.DataFrame) -> dict[str, float]:
    """The study's test means (``summarize``) as tracked metrics: ``<encoder>/<metric>_<group>/budget_<budget>``."""
    stats = summarize(rows)
    return {f"{r.encoder}/{r.metric}_{r.group}/budget_{r.budget}": float(r.mean) for r in stats.itertuples()}


def steps_run(rows: pd.DataFrame) -> str:
    """The pretraining steps each trained encoder ran (their range over seeds), from the rows' ``steps``."""
    trained = rows[rows["encoder"].isin(TRAINED)].groupby(["encoder", "seed"])["steps"].first()
    if trained.empty:
        return "none"
    return ", ".join(
        f"{e} {s.min()}" + (f"-{s.max()}" if s.max() != s.min() else "")
        for e, s in trained.groupby("encoder")
    )


def facts(cfg: StudyConfig, run_id: str, catalog_uri: str, work: str, rows: pd.DataFrame) -> dict[str, Any]:
    """The facts study.md opens with: the run, its scale, the protocol, and the seconds each encoder took."""
    stage_s = rows.groupby(["encoder", "seed"])[["pretrain_s", "embed_s", "tune_s"]].first().sum(axis=1)
    return {
        "run": run_id,
        "catalog": catalog_uri,
        "encoders": f"{', '.join(cfg.encoders)}; trained ones with seeds {', '.join(map(str, cfg.seeds))}, "
        "untrained references with the first",
        "pretraining": f"{cfg.encoder} width {cfg.width}, "
        + (
            f"{cfg.minutes:g} minutes of training (at most {cfg.steps} steps)"
            if cfg.minutes
            else f"{cfg.steps} steps"
        )
        + f" of {cfg.batch_size} clips (steps run: {steps_run(rows)}), "
        f"label share of semisupcon-low {cfg.label_share}, labeled share of a SemiSupCon batch "
        f"{cfg.batch_label_share}; options: {cfg.pretrain_options or 'none'}",
        "embedding": f"the labeled tracks, up to {cfg.max_chunks} chunks of 2.7 s each; "
        f"options: {cfg.embed_options or 'none'}",
        "few-shot protocol": f"the tune job's sweep, {rows['rep'].max() + 1} repetitions; "
        f"options: {cfg.tune_options or 'its defaults'}",
        "tags": f"{rows['n_head_tags'].max()} head, {rows['n_tail_tags'].max()} tail",
        "seconds per encoder (pretrain + embed + tune, all seeds)": ", ".join(
            f"{e} {t:.0f}" for e, t in stage_s.groupby("encoder").sum().items()
        ),
        "work root": work,
    }


def _cell(row: pd.Series, reference: str) -> str:
    if np.isnan(row["mean"]):
        return "n/a"
    text = f"{row['mean']:.3f} ± " + ("–" if np.isnan(row["std"]) else f"{row['std']:.3f}")
    if row["encoder"] != reference and not np.isnan(row["delta"]):
        text += f" ({row['delta']:+.3f}{' *' if row['beyond_spread'] else ''})"
    return text


def render_markdown(summary: pd.DataFrame, facts: dict[str, Any], encoders: list[str], reference: str) -> str:
    """study.md: the facts, then per metric one table of encoders (x tag group) by budgets."""
    budgets = sorted(summary["budget"].unique(), key=report.budget_order)
    lines = ["# Encoder study", ""]
    lines += [f"- {k}: {v}" for k, v in facts.items()]
    lines += [
        "",
        "Cells: test macro score, mean ± spread (standard deviation over every pretraining seed and probe "
        "repetition); each budget's probe configuration is chosen on the validation split, the test split "
        f"only reports. In brackets: the difference from `{reference}`, marked `*` when it is larger than "
        "the spread of a difference (the two spreads added in quadrature; never where a spread is 0 or `–`, a "
        "single value: nothing random was measured there).",
    ]
    indexed = summary.set_index(["encoder", "metric", "group", "budget"], drop=False)
    for metric, name in METRIC_NAMES.items():
        lines += ["", f"## Test macro {name}", ""]
        lines += [
            "| encoder | tags | " + " | ".join(budgets) + " |",
            "|---|---" + "|---" * len(budgets) + "|",
        ]
        for encoder in encoders:
            for group in report.GROUPS:
                keys = [(encoder, metric, group, b) for b in budgets]
                cells = [_cell(indexed.loc[k], reference) if k in indexed.index else "n/a" for k in keys]
                lines.append(f"| {encoder} | {group} | " + " | ".join(cells) + " |")
    lines += ["", "## Encoders", ""]
    lines += [f"- `{e}`: {ENCODERS[e]}" for e in encoders]
    lines += ["", "![test macro AP by label budget, one line per encoder](study.png)", ""]
    return "\n".join(lines)


def plot(summary: pd.DataFrame, uri: str, encoders: list[str]) -> None:
    """study.png: test macro AP against the label budget, one line per encoder, a band of ± the spread;
    panels for all, head and tail tags (sized as ``report.plot_budget_curve``)."""
    budgets = sorted(summary["budget"].unique(), key=report.budget_order)
    xs = np.arange(len(budgets))
    with plt.rc_context({"font.size": 11, "axes.titlesize": 12, "legend.fontsize": 9}):
        fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), sharex=True, sharey=True)
        for ax, group in zip(axes, report.GROUPS, strict=True):
            for encoder in encoders:
                part = summary[(summary["encoder"] == encoder) & (summary["metric"] == "ap")]
                part = part[part["group"] == group].set_index("budget").reindex(budgets)
                mean, std = part["mean"].to_numpy(float), part["std"].to_numpy(float)
                (line,) = ax.plot(xs, mean, marker="o", label=encoder)
                band = np.nan_to_num(std)
                ax.fill_between(xs, mean - band, mean + band, alpha=0.15, color=line.get_color())
            ax.set_xticks(xs, budgets)
            ax.set_xlabel("label budget (positive tracks per tag)")
            ax.set_title(f"{group} tags")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("test macro AP (0 to 1)")
        axes[-1].legend(loc="best")
        fig.text(
            0.5,
            0.01,
            "Lines: mean over pretraining seeds and probe repetitions; bands: ± 1 standard deviation. "
            "Each budget's probe chosen on the validation split; 'all': every labeled training track.",
            ha="center",
            fontsize=9,
        )
        fig.tight_layout(rect=(0, 0.05, 1, 1))
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
    storage.write_bytes(uri, buf.getvalue())


def finish(cfg: StudyConfig, run_id: str, rows: pd.DataFrame, facts: dict[str, Any]) -> versions.Manifest:
    """Write results.parquet, study.md and study.png, then publish the run (``_latest`` last)."""
    dataset = Layout(cfg.root).study
    uris = [storage.join(versions.version_uri(dataset, run_id), name) for name in OUTPUTS]
    encoders = [e for e in cfg.encoders if e in set(rows["encoder"])]
    reference = REFERENCE if REFERENCE in encoders else encoders[0]
    summary = summarize(rows, reference)
    storage.write_parquet(pa.Table.from_pandas(rows, preserve_index=False), uris[0])
    storage.write_bytes(uris[1], render_markdown(summary, facts, encoders, reference).encode())
    plot(summary, uris[2], encoders)
    return versions.publish(dataset, run_id, uris, [len(rows), 0, 0], config=dataclasses.asdict(cfg))


SETTINGS = (
    "encoder", "width", "minutes", "steps", "batch_size", "max_chunks", "label_share", "batch_label_share",
    "pretrain_options", "tune_options",
)  # fmt: skip


def compare_runs(dataset: str, budget: str = "20") -> pd.DataFrame:
    """Every committed study run under ``dataset``, one row per run and encoder: the run's settings, its
    seeds, and macro AP at ``budget`` on the validation split (to choose settings by) and the test split
    (only to report). ``best_on_valid`` marks each encoder's run with the highest validation AP, so a
    setting is chosen across runs on validation, as the probes' configurations are within one."""
    defaults = {f.name: f.default for f in dataclasses.fields(StudyConfig)}  # runs older than a setting
    defaults |= {"encoder": "samplecnn", "minutes": 0.0}  # the settings of every run before these options
    rows = []
    for run_id in versions.committed_versions(dataset):
        manifest = versions.read_manifest(dataset, run_id)
        results = storage.read_parquet([storage.join(versions.version_uri(dataset, run_id), OUTPUTS[0])])
        at = results.to_pandas()
        at = at[at["budget"] == budget]
        for encoder, scores in at.groupby("encoder", sort=False):
            rows.append(
                {
                    "run_id": run_id,
                    "encoder": encoder,
                    **{k: manifest.config.get(k, defaults[k]) for k in SETTINGS},
                    "seeds": scores["seed"].nunique(),
                    **{
                        f"{split}_ap_{group}": scores[f"{split}_ap_{group}"].mean()
                        for split in report.SPLITS
                        for group in ("all", "tail")
                    },
                }
            )
    table = pd.DataFrame(rows)
    if not table.empty:
        best = table.groupby("encoder")["valid_ap_all"].transform("max")
        table["best_on_valid"] = table["valid_ap_all"] == best
    return table


# --------------------------------------------------------------------------- the command line


def print_runs(dataset: str, budget: str) -> None:
    """The table of ``compare_runs``: scores per run and encoder (``*``: best on validation), then each
    run's settings."""
    table = compare_runs(dataset, budget)
    if table.empty:
        raise SystemExit(f"no study run with budget {budget} under {dataset}: run make study first")
    print(
        f"macro AP at {budget} labels per tag; choose on valid, test only reports (* best valid per encoder)"
    )
    scores = table[
        ["run_id", "encoder", "seeds", "valid_ap_all", "valid_ap_tail", "test_ap_all", "test_ap_tail"]
    ]
    scores = scores.assign(best=table["best_on_valid"].map({True: "*", False: ""}))
    print(scores.to_string(index=False, float_format="{:.3f}".format))
    for run_id, settings in table.groupby("run_id", sort=False):
        first = settings.iloc[0]
        print(f"{run_id}: " + ", ".join(f"{k} {first[k]}" for k in SETTINGS))


USAGE = (
    "usage: python -m musiclib.study.study study-runs [--root ROOT] [--budget 20]\n"
    "       python -m musiclib.study.study study-plot OUT.png [--root ROOT] [--run-id RUN]"
)


def main(argv: list[str] | None = None) -> None:
    """``study-runs`` compares every study run of a root at one budget, validation first, to choose
    pretraining settings on it (``compare_runs``); ``study-plot`` copies a study run's ``study.png``
    (default: the latest run; the README's figure comes from it, ``make docs-images``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    options = {"--root": DEFAULT_ROOT, "--run-id": None, "--budget": "20"}
    take_flags(args, options, USAGE)
    root = storage.normalize_uri(options["--root"])
    dataset = Layout(root).study
    if args == ["study-runs"]:
        print_runs(dataset, options["--budget"])
        return
    if len(args) != 2 or args[0] != "study-plot":
        raise SystemExit(USAGE)
    run_id = options["--run-id"] or versions.latest_version(dataset)
    if run_id is None:
        raise SystemExit(f"no study run under {dataset}: run make study first")
    out = storage.normalize_uri(args[1])
    storage.write_bytes(
        out, storage.read_bytes(storage.join(versions.version_uri(dataset, run_id), "study.png"))
    )
    print(f"study plot of run {run_id} under {root}: {args[1]}")


if __name__ == "__main__":
    main()
