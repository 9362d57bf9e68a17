"""Experiment tracking (``--mlflow-uri``): the URI's check and, against a real MLflow server with basic auth,
what pretrain, tune and the study log. Without the flag nothing is imported or logged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import write_synthetic_root

from jobs import pretrain as pretrain_job
from jobs import study as study_job
from jobs import tune as tune_job
from musiclib.core import storage, tracking, versions
from musiclib.core.config import ConfigError, Layout, parse
from musiclib.probe.sweep import TuneConfig
from musiclib.study import study
from musiclib.train import models
from musiclib.train.pretraining import PretrainConfig, resume_conflicts

SMALL_TUNE = [
    "--budgets", "2,all", "--probes", "logreg,centroid", "--norms", "standardize", "--c-grid", "1",
    "--repetitions", "2", "--representations", "embedding", "--max-concurrent", "1",
]  # fmt: skip


def test_the_uri_is_checked_and_a_password_in_it_is_refused_and_never_printed(monkeypatch):
    for good in ("http://127.0.0.1:5000", "https://mlflow.example.com", "sqlite:///m.db"):
        assert tracking.problems(good) == [], good
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    assert "use sqlite:///<path>.db" in tracking.problems("file:/tmp/mlruns")[0]
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert tracking.problems("file:/tmp/mlruns") == []
    assert tracking.problems("databricks") == [] and tracking.problems("") == []
    assert "http(s)://host, file:, sqlite: or databricks" in tracking.problems("ftp://host/x")[0]
    assert tracking.problems("http:///no-host") == ["--mlflow-uri 'http:///no-host': no host"]
    [line] = tracking.problems("https://ann:hunter22@mlflow.example.com/")
    assert (
        "hunter22" not in line and "ann:***@mlflow.example.com" in line and "MLFLOW_TRACKING_PASSWORD" in line
    )
    assert tracking.mask("https://ann:hunter22@h:8/p") == "https://ann:***@h:8/p"
    assert tracking.mask("https://ann@h/p") == "https://ann@h/p"
    with pytest.raises(ConfigError, match="mlflow-uri 'ftp://x'") as raised:
        parse(PretrainConfig, ["--mlflow-uri", "ftp://x"])
    assert "\n  " in str(raised.value)  # one of the job's listed problems, before Ray starts
    with pytest.raises(ConfigError, match="no password in the URI"):
        parse(TuneConfig, ["--mlflow-uri", "http://u:p@127.0.0.1:5000"])
    with pytest.raises(ConfigError, match="mlflow-uri 'ftp://x'") as raised:
        parse(study.StudyConfig, ["--mlflow-uri", "ftp://x"])
    assert str(raised.value).count("mlflow-uri") == 1  # not again for the jobs the study runs


def test_tracking_changes_no_run_id_and_a_pretraining_resumes_with_it(tmp_path):
    """The flag is operational: the same tune sweep and study are the same runs, a checkpoint resumes."""
    root = str(tmp_path / "root")
    write_synthetic_root(root)
    layout, uri = Layout(root), "http://127.0.0.1:5000"
    plain, tracked = TuneConfig(root=root), TuneConfig(root=root, mlflow_uri=uri)
    from musiclib.probe import sweep

    model = versions.latest_version(layout.models) or "m"
    assert sweep.derive_run_id(plain, layout, model) == sweep.derive_run_id(tracked, layout, model)
    plain_study, tracked_study = study.StudyConfig(root=root), study.StudyConfig(root=root, mlflow_uri=uri)
    assert study.derive_run_id(plain_study, layout) == study.derive_run_id(tracked_study, layout)
    assert (
        study.pretrain_config(tracked_study, root, "clmr", 0).mlflow_uri == uri
    )  # the study's jobs track too
    assert study.tune_config(tracked_study, root, "m", local=False).mlflow_uri == uri
    saved = PretrainConfig(root=root).as_dict()
    assert resume_conflicts(saved, PretrainConfig(root=root, mlflow_uri=uri)) == []


def test_a_lost_metrics_request_is_printed_and_training_goes_on(monkeypatch, capsys):
    pytest.importorskip("mlflow", reason="the MLflow client comes with the test extra: make setup")
    from conftest import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    callback = pretrain_job.MLflowMetrics(tracking.Tracked(f"http://127.0.0.1:{free_port()}", "r1"))
    callback.after_report(None, [{"step": 7, "loss": 1.5}], None)  # nothing listens there
    assert "pretrain: MLflow did not take the metrics of step 7: " in capsys.readouterr().out


@pytest.mark.slow
def test_without_the_flag_mlflow_is_not_imported():
    """Every job's config defaults to no tracking; the jobs and an untracked run import no mlflow."""
    assert PretrainConfig().mlflow_uri == TuneConfig().mlflow_uri == study.StudyConfig().mlflow_uri == ""
    code = (
        "import sys\n"
        "from jobs import pretrain, study, tune\n"
        "from musiclib.core import tracking\n"
        "with tracking.run('', 'x', {'a': 1}) as tracked:\n"
        "    tracking.log_metrics(tracked, {'m': 1.0}, 1)\n"
        "    tracking.log_dict(tracked, {'card': 1}, 'card.json')\n"
        "    tracking.log_files(tracked, ['/nonexistent'])\n"
        "assert tracked is None\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'mlflow'))\n"
    )
    project = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=project, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stdout + run.stderr


def runs(uri: str, job: str, parent: str | None = None) -> list:
    """The runs of ``job`` in the tracking experiment (children of ``parent`` only, when given)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT)
    query = f"tags.`musiclib.job` = '{job}'"
    if parent:
        query += f" and tags.`mlflow.parentRunId` = '{parent}'"
    return client.search_runs([experiment.experiment_id], query, max_results=1000)


def artifact_text(uri: str, run_id: str, name: str, folder: Path) -> str:
    from mlflow import MlflowClient

    return Path(MlflowClient(uri).download_artifacts(run_id, name, str(folder))).read_text()


@pytest.mark.slow
def test_pretrain_logs_its_config_every_logged_step_and_the_card(mlflow_server, tmp_path, capsys):
    from mlflow import MlflowClient

    from musiclib.datasets import demo

    root = str(tmp_path / "root")
    demo.make_catalog(root, n_tracks=12, labeled_fraction=1.0, min_seconds=3.0, max_seconds=4.0, workers=1)
    argv = ["--root", root, "--width", "0.0625", "--num-workers", "1", "--batch-size", "4", "--steps", "3"]
    argv += ["--log-every", "1", "--checkpoint-every", "2", "--p-pitch", "0", "--run-name", "tracked"]
    model_id = pretrain_job.main([*argv, "--mlflow-uri", mlflow_server])

    [run] = runs(mlflow_server, "pretrain")
    assert run.info.run_name == "pretrain:tracked" and run.info.status == "FINISHED"
    assert run.data.params["steps"] == "3" and run.data.params["width"] == "0.0625"
    client = MlflowClient(mlflow_server)
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3]  # every reported step, as the workers reported it
    card_text = artifact_text(mlflow_server, run.info.run_id, "card.json", tmp_path / "artifacts")
    card = json.loads(card_text)
    assert card == models.load_card(Layout(root).models, model_id) and card["steps"] == 3
    password = os.environ["MLFLOW_TRACKING_PASSWORD"]
    printed = capsys.readouterr()
    for text in (card_text, json.dumps(run.data.params), printed.out, printed.err):
        assert password not in text
    assert f"at {mlflow_server}" in printed.out


@pytest.mark.slow
def test_tune_logs_the_sweep_and_a_nested_run_per_trial(mlflow_server, tmp_path):
    root = str(tmp_path / "root")
    write_synthetic_root(root)
    manifest = tune_job.main(["--root", root, *SMALL_TUNE, "--mlflow-uri", mlflow_server])

    [parent] = [r for r in runs(mlflow_server, "tune") if r.info.run_name == manifest.version]
    assert parent.info.status == "FINISHED" and parent.data.params["budgets"] == "['2', 'all']"
    assert 0.5 < parent.data.metrics["test_ap_all/budget_all"] <= 1.0
    assert "valid_ap_all/budget_2" in parent.data.metrics and "wall_s" in parent.data.metrics
    from mlflow import MlflowClient

    names = {a.path for a in MlflowClient(mlflow_server).list_artifacts(parent.info.run_id)}
    assert names == {"report.md", "budget_curve.png"}
    trials = runs(mlflow_server, "tune", parent=parent.info.run_id)
    assert len(trials) == 2 * 2  # budgets x probes: one Tune trial each
    for trial in trials:
        assert trial.info.status == "FINISHED" and 0 <= trial.data.metrics["valid_macro_ap"] <= 1
        assert "'probe':" in trial.data.params["trial"]
    # a complete run is only made current: nothing is logged again
    assert (
        tune_job.main(["--root", root, *SMALL_TUNE, "--mlflow-uri", mlflow_server]).version
        == manifest.version
    )
    assert len(runs(mlflow_server, "tune")) == 1 + len(trials)


@pytest.mark.slow
def test_the_study_logs_a_run_with_nested_variants_and_its_results(mlflow_server, tmp_path):
    """The study job's tracking without its jobs (a study runs minutes): its run, a nested variant run, and
    ``log_results`` with the outputs ``study.finish`` writes from tune-style rows."""
    from test_study import _sweep_rows

    root = str(tmp_path / "root")
    cfg = study.StudyConfig(root=root, encoders=["clmr", "logmel"], seeds=[0])
    rows = pd.concat(
        study.variant_rows(pd.DataFrame(_sweep_rows({"20-a": [ap, ap + 0.1]}, "20")), encoder, 0, "m")
        for encoder, ap in (("clmr", 0.4), ("logmel", 0.2))
    )
    with tracking.run(
        mlflow_server, "study-test", {"encoders": cfg.encoders}, study_job.TRACKING_TAGS
    ) as top:
        with tracking.run(mlflow_server, "clmr-s0", {"encoder": "clmr"}, study_job.TRACKING_TAGS) as variant:
            tracking.log_metrics(variant, {"pretrain_s": 2.5, "steps": 3})
        study.finish(cfg, "study-test", rows, {"run": "study-test"})
        study_job.log_results(top, rows, versions.version_uri(Layout(root).study, "study-test"))

    [parent] = [r for r in runs(mlflow_server, "study") if r.info.run_name == "study-test"]
    [child] = runs(mlflow_server, "study", parent=parent.info.run_id)
    assert child.info.run_name == "clmr-s0" and child.data.metrics == {"pretrain_s": 2.5, "steps": 3.0}
    expected = study.summarize(rows).set_index(["encoder", "metric", "group", "budget"])["mean"]
    assert parent.data.metrics["clmr/ap_all/budget_20"] == pytest.approx(expected["clmr", "ap", "all", "20"])
    assert parent.data.metrics["logmel/ap_tail/budget_20"] == pytest.approx(
        expected["logmel", "ap", "tail", "20"]
    )
    text = artifact_text(mlflow_server, parent.info.run_id, "study.md", tmp_path / "artifacts")
    out = versions.version_uri(Layout(root).study, "study-test")
    assert text == storage.read_bytes(storage.join(out, "study.md")).decode()
    from mlflow import MlflowClient

    names = {a.path for a in MlflowClient(mlflow_server).list_artifacts(parent.info.run_id)}
    assert names == set(study.OUTPUTS)
