"""The tune job end to end on a small synthetic catalog: outputs, choices made on valid, resume."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import SYNTHETIC_MODEL, write_synthetic_root

from jobs import tune as tune_job
from musiclib import catalog
from musiclib.core import storage, versions
from musiclib.core.config import ConfigError, Layout
from musiclib.datasets import tagged_embeddings
from musiclib.embed import table as embeddings_table
from musiclib.probe import fewshot, probes, report, sweep

SMALL = [
    "--budgets", "2,all", "--probes", "logreg,linear,centroid", "--norms", "standardize",
    "--c-grid", "1", "--epochs", "60", "--repetitions", "2", "--tolerance", "0.05",
]  # fmt: skip


def test_config_is_validated_before_any_work(tmp_path):
    for argv in (["--budgets", "0"], ["--probes", "svm"], ["--norms", "zca"], ["--repetitions", "0"]):
        with pytest.raises(ConfigError):
            tune_job.main(["--root", str(tmp_path), *argv])
    with pytest.raises(ConfigError, match="--max-failures"):
        tune_job.main(["--root", str(tmp_path), "--max-failures", "-2"])
    with pytest.raises(ConfigError, match="--representations: unknown or empty \\['mfcc'\\]"):
        tune_job.main(["--root", str(tmp_path), "--representations", "embedding,mfcc"])
    root = str(tmp_path / "r")
    write_synthetic_root(root, n_tracks=80)
    with pytest.raises(ConfigError, match="no training labels for jazz"):
        tune_job.main(["--root", root, "--tags", "jazz"])
    with pytest.raises(ConfigError, match="catalog not found"):
        tune_job.main(["--root", str(tmp_path / "empty")])


def test_a_catalog_without_validation_labels_is_refused_before_ray(tmp_path):
    """Configurations are chosen on the validation split: without it there is nothing honest to choose on."""
    cat, emb = tagged_embeddings.make(n_tracks=80, n_tags=8, dim=16, model_id=SYNTHETIC_MODEL)
    split = cat.schema.get_field_index("split")
    no_valid = pc.if_else(pc.equal(cat["split"], "valid"), "train", cat["split"])
    layout = Layout(str(tmp_path))
    catalog.write(cat.set_column(split, cat.schema.field(split), no_valid), layout.catalog)
    embeddings_table.publish_table(layout.embeddings, SYNTHETIC_MODEL, "v1", emb)
    versions.publish(
        layout.models, SYNTHETIC_MODEL, [], []
    )  # a model without an encoder: tune reads embeddings
    with pytest.raises(ConfigError, match="0 labeled validation tracks"):
        tune_job.main(["--root", str(tmp_path)])


def _results(scores: dict[tuple[str, float], dict[str, tuple[float, float]]]) -> pd.DataFrame:
    """A sweep's long table from ``{(budget, C): {tag: (valid AP, test AP)}}``, two repetitions per budget
    below ``all``; ROC-AUC mirrors AP so both metrics agree on what is best."""
    rows = []
    for (budget, c), per_tag in scores.items():
        config = {"budget": budget, "probe": "logreg", "norm": "standardize", "C": c}
        for rep in range(1 if budget == "all" else 2):
            for tag, (valid, test) in per_tag.items():
                rows.append(
                    {
                        "trial": fewshot.trial_key(config),
                        "budget": budget,
                        "probe": "logreg",
                        "norm": "standardize",
                        "params": fewshot.params_text({"C": c}),
                        "rep": rep,
                        "tag": tag,
                        "group": "head" if tag == "t0" else "tail",
                        "n_support": 10,
                        "valid_ap": valid,
                        "valid_roc_auc": valid,
                        "test_ap": test,
                        "test_roc_auc": test,
                        "fit_s": 0.01,
                    }
                )
    return pd.DataFrame(rows)


def test_every_choice_is_made_on_valid_and_reports_test():
    """At each budget the valid-best and the test-best configuration differ: the valid-best one is chosen,
    and its test score (not the better test score of the other) is what the report and plot show."""
    results = _results(
        {
            ("2", 0.1): {"t0": (0.88, 0.5), "t1": (0.72, 0.5)},  # valid-best at 2
            ("2", 1.0): {"t0": (0.6, 0.9), "t1": (0.6, 0.9)},  # test-best at 2
            ("all", 0.1): {"t0": (0.7, 0.95), "t1": (0.7, 0.95)},  # test-best at all
            ("all", 1.0): {"t0": (0.9, 0.6), "t1": (0.9, 0.6)},  # valid-best at all
        }
    )
    summary = report.trial_summary(results)
    best = report.best_per_budget(summary)
    assert list(best["budget"]) == ["2", "all"] and list(best["params"]) == ["C=0.1", "C=1.0"]
    assert best["test_ap_all_mean"].tolist() == pytest.approx([0.5, 0.6])
    assert best["valid_ap_all_mean"].tolist() == pytest.approx([0.8, 0.9])
    assert best.iloc[-1]["trial"] == "all-logreg-standardize-C=1.0"  # what the final probe set refits

    # t0 at budget 2 is within 0.05 of full labels on valid (0.88 vs 0.9), t1 is not (0.72);
    # on test the chosen configurations say otherwise (0.5 vs 0.6), which must not matter
    cheapest = report.cheapest_budgets(results, best, tolerance=0.05).set_index("tag")
    assert cheapest["cheapest_budget"].to_dict() == {"t0": "2", "t1": "all"}
    assert cheapest.loc["t0", "test_ap_at_budget"] == pytest.approx(0.5)
    assert cheapest.loc["t0", "test_full_ap"] == pytest.approx(0.6)
    assert cheapest.loc["t1", "valid_ap_at_budget"] == pytest.approx(0.9)

    text = report.render_markdown(summary, best, cheapest.reset_index(), {"run_id": "r"}, 0.05)
    lines = text.splitlines()
    row_2 = next(line for line in lines if line.startswith("| 2 | logreg"))
    assert "C=0.1" in row_2 and "0.800 ± 0.000 | 0.500 ± 0.000" in row_2 and "0.900" not in row_2
    probe_row = next(line for line in lines if line.startswith("| 2 | 0."))
    assert probe_row == "| 2 | 0.500 ± 0.000 |"
    assert "| t0 | head | 2 | 0.880 | 0.900 | 0.500 | 0.600 |" in lines


def test_trial_slots_are_cores_on_a_local_ray_and_cpus_on_a_cluster():
    cfg = tune_job.TuneConfig(num_cpus=2)
    assert tune_job.trial_slots(cfg, local=True, cluster_cpus=4) == 2  # local Ray advertises >= 4
    assert tune_job.trial_slots(cfg, local=False, cluster_cpus=64) == 64
    assert tune_job.trial_slots(tune_job.TuneConfig(max_concurrent=3), local=True, cluster_cpus=4) == 3


def test_trials_hold_every_configuration_once_longest_first():
    configs = sweep.configurations(sweep.TuneConfig(budgets=["1", "all"]))
    groups = sweep.group_by_trial(configs)
    assert sorted(fewshot.trial_key(c) for g in groups for c in g) == sorted(map(fewshot.trial_key, configs))
    assert len(set(map(fewshot.trial_key, configs))) == len(configs)
    assert all(len({c["probe"] for c in g}) == 1 for g in groups)
    for group in groups:  # the learned embedding with every normalisation, fused with standardize alone
        got = sorted((c["representation"], c["norm"]) for c in group)
        assert got == sorted([("embedding", n) for n in probes.NORMS] + [("fused", "standardize")])
    l2 = sweep.configurations(sweep.TuneConfig(budgets=["all"], probes=["centroid"], norms=["l2"]))
    assert [(c["representation"], c["norm"]) for c in l2] == [("embedding", "l2"), ("fused", "standardize")]
    order = [g[0]["probe"] for g in groups]
    assert order == sorted(order, key=sweep.LONGEST_FIRST.index) and order[0] == "logreg"


def disagreeing_data() -> fewshot.ProbeData:
    """Two tags whose log-mel statistics follow the labels on train and valid and oppose them on test, with
    a learned embedding of noise: the fused representation wins on valid and loses on test."""
    rng = np.random.default_rng(0)
    sizes = {"train": 160, "valid": 80, "test": 80}
    y = {s: rng.random((n, 2)) < 0.4 for s, n in sizes.items()}
    x = {s: rng.normal(size=(n, 12)).astype(np.float32) for s, n in sizes.items()}
    sign = {"train": 1.0, "valid": 1.0, "test": -1.0}
    logmel = {
        s: (sign[s] * 2.0 * y[s].astype(np.float32) + 0.7 * rng.normal(size=(n, 2)) - 5.0).astype(np.float32)
        for s, n in sizes.items()
    }
    ids = {s: [f"{s}{i}" for i in range(n)] for s, n in sizes.items()}
    counts = {"a": int(y["train"][:, 0].sum()), "b": int(y["train"][:, 1].sum())}
    return fewshot.ProbeData(["a", "b"], ["a"], ["b"], counts, x, y, ids, "m", {}, logmel)


def test_the_fused_representation_is_chosen_on_valid_only(tmp_path):
    """Valid and test disagree on the representation: the one best on valid (fused) is chosen and reported
    with its poorer test score, and the final probe set reads it."""
    data = disagreeing_data()
    cfg = sweep.TuneConfig(budgets=["all"], probes=["logreg"], norms=["standardize"], c_grid=[1.0])
    configs = sweep.configurations(cfg)
    assert [c["representation"] for c in configs] == ["embedding", "fused"]
    results = pd.DataFrame([r for c in configs for r in fewshot.run_config(data, c, 1, 0)])
    summary = report.trial_summary(results).set_index("representation")
    assert summary.loc["fused", "valid_ap_all_mean"] > summary.loc["embedding", "valid_ap_all_mean"] + 0.2
    assert summary.loc["fused", "test_ap_all_mean"] < summary.loc["embedding", "test_ap_all_mean"] - 0.1
    best = report.best_per_budget(report.trial_summary(results))
    assert (
        list(best["representation"]) == ["fused"]
        and best.iloc[0]["trial"] == "all-logreg-fused-standardize-C=1.0,class_weight=balanced"
    )
    assert best.iloc[0]["test_ap_all_mean"] == pytest.approx(summary.loc["fused", "test_ap_all_mean"])

    layout = Layout(str(tmp_path))
    manifest = sweep.finish(cfg, layout, data, "tune-x", results, {})
    run_dir = versions.version_uri(layout.probes, "tune-x")
    probe_set = probes.ProbeSet.load(storage.join(run_dir, "probe_set.safetensors"))
    assert probe_set.representation == "fused" and manifest.extra["best"]["representation"] == "fused"
    assert probe_set.weights.shape == (14, 2)  # 12 learned dimensions, then 2 statistics
    text = open(storage.join(run_dir, "report.md")).read()
    assert "| all | logreg / standardize / C=1.0,class_weight=balanced | fused | 160 |" in text


def test_embeddings_without_logmel_offer_the_learned_embedding_alone(tmp_path, capsys):
    """Embeddings written before the embed job computed the statistics: tune says in one line that fused
    is not offered and sweeps the rest; asked for nothing they can give, it stops."""
    root = str(tmp_path)
    write_synthetic_root(root, n_tracks=80)
    layout = Layout(root)
    cfg = sweep.TuneConfig(root=root)
    data = sweep.load_data(cfg, layout, SYNTHETIC_MODEL)
    assert data.representations == ("embedding",) and data.logmel == {}
    assert sweep.narrow(cfg, data).representations == ["embedding"]
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "no logmel column" in line and "fused not offered" in line
    with pytest.raises(ConfigError, match="none offered by these embeddings"):
        sweep.narrow(sweep.TuneConfig(root=root, representations=["logmel"]), data)
    with pytest.raises(ConfigError, match="no logmel column"):
        data.features("fused")


@pytest.mark.slow
def test_small_sweep_writes_every_output_and_resumes(tmp_path, ray_local, monkeypatch):
    root = str(tmp_path / "root")
    write_synthetic_root(root, logmel_dim=6)  # embeddings with log-mel statistics: fused is offered
    layout = Layout(root)
    older = storage.join(versions.version_uri(layout.probes, "tune-older"), "note.txt")
    storage.write_bytes(older, b"an earlier run")
    versions.publish(layout.probes, "tune-older", [older], [0])

    # killed between writing the manifest and moving the pointer: _latest stays on the older run
    def crash(*args, **kwargs):
        raise RuntimeError("killed before the pointer moved")

    with monkeypatch.context() as patch:
        patch.setattr(versions, "set_latest", crash)
        with pytest.raises(RuntimeError, match="killed"):
            tune_job.main(["--root", root, *SMALL])
    assert versions.latest_version(layout.probes) == "tune-older"
    # the run is complete, so running it again does nothing but move the pointer
    manifest = tune_job.main(["--root", root, *SMALL])
    run_id = manifest.version
    run_dir = versions.version_uri(layout.probes, run_id)
    assert versions.latest_version(layout.probes) == run_id
    assert {f.path.split("/")[-1] for f in manifest.files} == {
        "results.parquet", "report.md", "budget_curve.png", "probe_set.safetensors",
    }  # fmt: skip

    results = pq.read_table(storage.join(run_dir, "results.parquet")).to_pandas()
    n_configs = 2 * 3 * 2  # budgets x probes x representations (the learned embedding, fused)
    assert results["trial"].nunique() == n_configs
    assert set(results["representation"]) == {"embedding", "fused"}
    reps = results.groupby("trial")["rep"].nunique()
    assert (reps[results.groupby("trial")["budget"].first() != "all"] == 2).all()
    assert results.groupby("trial")["tag"].nunique().eq(8).all()
    full = results[results["budget"] == "all"]
    assert full["test_roc_auc"].mean() > 0.9 and full["valid_roc_auc"].mean() > 0.9  # correlated embeddings

    text = open(storage.join(run_dir, "report.md")).read()
    assert "## Chosen configuration per budget" in text and "overhead" not in text  # timings: the manifest
    assert "| representation |" in text
    for budget in ("2", "all"):
        assert any(line.startswith(f"| {budget} | ") and " / " in line for line in text.splitlines())
    assert "Cheapest budget within 0.05" in text and "excluded tracks: 3" in text
    assert open(storage.join(run_dir, "budget_curve.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    probe_set = probes.ProbeSet.load(storage.join(run_dir, "probe_set.safetensors"))
    assert (
        probe_set.model_id == SYNTHETIC_MODEL
        and len(probe_set.tags) == 8
        and probe_set.thresholds is not None
    )
    assert probe_set.config["probe_run_id"] == run_id
    summary = report.trial_summary(results)
    chosen = summary.loc[summary[summary["budget"] == "all"]["valid_ap_all_mean"].idxmax()]
    assert manifest.extra["best"]["trial"] == chosen["trial"]
    assert {k: probe_set.config[k] for k in ("probe", "representation", "norm")} == {
        "probe": chosen.probe,
        "representation": chosen.representation,
        "norm": chosen.norm,
    }
    assert probe_set.representation == chosen.representation

    # a finished run is a no-op; an interrupted one redoes only the missing trials
    assert tune_job.main(["--root", root, *SMALL]).created_at == manifest.created_at
    rerun = storage.read_json(storage.join(root, "summaries", "tune.json"))
    assert rerun["wrote"].startswith(f"nothing: version {run_id} ") and rerun["outputs"]["version"] == run_dir
    storage.delete(versions.manifest_uri(layout.probes, run_id))
    trial_files = storage.list_files(storage.join(run_dir, "trials"), ".parquet")
    assert len(trial_files) == n_configs
    storage.delete(trial_files[0])
    mtimes = {u: os.path.getmtime(u) for u in trial_files[1:]}
    tune_job.main(["--root", root, *SMALL])
    assert storage.exists(trial_files[0])
    assert all(os.path.getmtime(u) == t for u, t in mtimes.items())
    assert versions.read_manifest(layout.probes, run_id) is not None
