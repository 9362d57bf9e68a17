"""The study: the log-mel floor against torchaudio, the tables from sweep rows, and a tiny run of the job."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
import torchaudio

from musiclib import audio, catalog
from musiclib.core import config, storage, versions
from musiclib.datasets.audio_files import encode
from musiclib.embed import logmel
from musiclib.embed.embedder import EmbedConfig
from musiclib.probe.sweep import TuneConfig
from musiclib.study import study
from musiclib.train.pretraining import PretrainConfig


def test_logmel_features_equal_a_direct_torchaudio_computation(tmp_path):
    """Mean and standard deviation per band over the frames of every chunk the embed stage reads."""
    rng = np.random.default_rng(0)
    t = np.arange(int(3.4 * audio.CHUNK_SAMPLES)) / audio.SAMPLE_RATE
    x = 0.3 * np.sin(2 * np.pi * 440 * t) * (1 + np.sin(2 * np.pi * 0.5 * t)) + 0.05 * rng.standard_normal(
        len(t)
    )
    (tmp_path / "a.wav").write_bytes(encode(x, audio.SAMPLE_RATE, "wav"))
    rows = pa.table({"track_id": ["a", "gone"], "audio_uri": ["a.wav", "gone.wav"]})
    cfg = logmel.LogMelConfig(n_mels=32)

    got = logmel.embed_rows(rows, str(tmp_path), max_chunks=8, config=cfg)

    chunks = audio.from_int16(audio.to_int16(audio.chunk(audio.load(str(tmp_path / "a.wav")), max_chunks=8)))
    assert len(chunks) == 3
    mel = torchaudio.transforms.MelSpectrogram(
        audio.SAMPLE_RATE, n_fft=cfg.n_fft, hop_length=cfg.hop, n_mels=32
    )
    frames = torch.cat(list(torch.log(mel(torch.from_numpy(chunks)).double() + logmel.LOG_OFFSET)), dim=1)
    expected = torch.cat([frames.mean(1), frames.std(1, correction=0)]).numpy()
    embedding = got.column("embedding").to_pylist()
    np.testing.assert_allclose(np.asarray(embedding[0]), expected, rtol=1e-4, atol=1e-4)
    assert embedding[1] is None and got.column("error").to_pylist() == [None, "missing"]
    assert got.column("model_id").to_pylist() == [cfg.model_id] * 2


def _sweep_rows(aps: dict[str, list[float]], budget: str) -> list[dict]:
    """Tune-style rows of one configuration: per repetition, a head tag and a tail tag with these APs."""
    rows = []
    for trial, values in aps.items():
        for rep, ap in enumerate(values):
            for tag, group, shift in (("h", "head", 0.1), ("t", "tail", -0.1)):
                rows.append(
                    {"trial": trial, "budget": budget, "probe": "logreg", "norm": "l2", "params": "",
                     "rep": rep, "tag": tag, "group": group, "n_support": 4, "fit_s": 0.0,
                     "valid_ap": ap + shift, "test_ap": ap + shift + 0.01,
                     "valid_roc_auc": 0.5 + ap / 2, "test_roc_auc": 0.5 + ap / 2}
                )  # fmt: skip
    return rows


def test_variant_rows_take_each_budgets_configuration_chosen_on_valid():
    results = pd.DataFrame(
        _sweep_rows({"1-a": [0.2, 0.4], "1-b": [0.5, 0.7]}, "1") + _sweep_rows({"all-a": [0.8]}, "all")
    )
    rows = study.variant_rows(results, "clmr", seed=3, model_id="m")
    assert list(rows["budget"]) == ["1", "1", "all"] and set(rows["trial"]) == {"1-b", "all-a"}
    assert rows["test_ap_all"].tolist() == pytest.approx([0.51, 0.71, 0.81])
    assert rows["test_ap_head"].tolist() == pytest.approx([0.61, 0.81, 0.91])
    assert rows["test_ap_tail"].tolist() == pytest.approx([0.41, 0.61, 0.71])
    assert set(rows["seed"]) == {3} and set(rows["encoder"]) == {"clmr"}


def test_summary_pools_seeds_and_repetitions_and_flags_differences_beyond_the_spread():
    frames = []
    for encoder, shift in (("clmr", 0.0), ("supervised", 0.3), ("random", 0.01)):
        for seed in (0, 1):
            results = pd.DataFrame(
                _sweep_rows({"1-a": [0.2 + shift + 0.02 * seed, 0.3 + shift]}, "1")
                + _sweep_rows({"all-a": [0.6 + shift]}, "all")  # the whole pool: the same every time
            )
            frames.append(study.variant_rows(results, encoder, seed, model_id=f"{encoder}-{seed}"))
    summary = study.summarize(pd.concat(frames), reference="clmr")
    row = summary.set_index(["encoder", "budget", "metric", "group"]).loc[("supervised", "1", "ap", "all")]
    values = 0.2 + 0.3 + 0.01 + np.array([0.0, 0.1, 0.02, 0.1])  # (seed, rep) of the sweep rows' test AP
    assert row["mean"] == pytest.approx(values.mean())
    assert row["std"] == pytest.approx(values.std(ddof=1))
    assert row["delta"] == pytest.approx(0.3) and row["beyond_spread"]
    near = summary.set_index(["encoder", "budget", "metric", "group"]).loc[("random", "1", "ap", "all")]
    assert near["delta"] == pytest.approx(0.01) and not near["beyond_spread"]
    whole = summary.set_index(["encoder", "budget", "metric", "group"]).loc[
        ("supervised", "all", "ap", "all")
    ]
    assert whole["std"] == 0 and whole["delta"] == pytest.approx(0.3) and not whole["beyond_spread"]


def test_runs_are_compared_on_validation_and_the_test_split_only_reports(tmp_path, capsys):
    dataset = str(tmp_path / "study")
    for run_id, lr, valid, test in (("study-a", "5e-4", 0.30, 0.40), ("study-b", "2e-3", 0.35, 0.20)):
        frames = [
            study.variant_rows(
                pd.DataFrame(_sweep_rows({"20-a": [valid, valid + 0.1]}, "20")), "clmr", seed, "m"
            )
            for seed in (0, 1)
        ]
        rows = pd.concat(frames).assign(test_ap_all=test)
        uri = storage.join(versions.version_uri(dataset, run_id), "results.parquet")
        storage.write_parquet(pa.Table.from_pandas(rows, preserve_index=False), uri)
        config = {"steps": 70, "pretrain_options": f"--lr {lr}"}
        versions.publish(dataset, run_id, [uri], [len(rows)], config=config)
    table = study.compare_runs(dataset, "20").set_index("run_id")
    assert table.loc["study-b", "valid_ap_all"] == pytest.approx(0.40)  # mean over seeds and repetitions
    assert table.loc["study-b", "seeds"] == 2 and table.loc["study-a", "pretrain_options"] == "--lr 5e-4"
    assert table["best_on_valid"].to_dict() == {"study-a": False, "study-b": True}  # not test's choice
    assert study.compare_runs(dataset, "5").empty
    study.print_runs(dataset, "20")
    printed = capsys.readouterr().out
    # unrecorded: the default, or for options newer than the run the settings every earlier run had
    assert (
        "study-b: encoder samplecnn, width 0.25, minutes 0.0, steps 70" in printed and "--lr 2e-3" in printed
    )
    assert table.loc["study-a", "batch_label_share"] == study.StudyConfig().batch_label_share


def test_config_lists_every_problem_and_refuses_options_the_study_sets(tmp_path):
    with pytest.raises(config.ConfigError) as err:
        config.parse(
            study.StudyConfig,
            ["--root", str(tmp_path), "--encoders", "clmr,nope", "--seeds", "", "--label-share", "1.5"]
            + ["--batch-label-share", "1"]
            + ["--pretrain-options", "--p-s 0.5 --lr -1", "--tune-options", "--budgets 0"],
        )
    message = str(err.value)
    for expected in (
        "nope",
        "--seeds",
        "--label-share 1.5",
        "--batch-label-share 1",
        "--p-s",
        "--lr",
        "--budgets",
        "catalog not found",
    ):
        assert expected in message


def test_each_trained_encoder_gets_its_label_settings():
    cfg = study.StudyConfig(label_share=0.05, batch_label_share=0.25)

    def p_s_b_s(encoder: str) -> tuple[float, float]:
        pretrain = study.pretrain_config(cfg, "/r", encoder, 1)
        return pretrain.p_s, pretrain.b_s

    assert p_s_b_s("clmr") == (0.0, 0.0)
    assert p_s_b_s("semisupcon-low") == (0.05, 0.25)
    assert p_s_b_s("semisupcon-all") == (1.0, 0.25)
    assert p_s_b_s("supervised") == (1.0, 1.0)


def test_the_study_builds_each_jobs_config_with_its_settings_and_the_pass_through_options():
    """The study calls the jobs with configs, not command lines: its own settings, then the options."""
    cfg = study.StudyConfig(width=0.5, steps=30, batch_size=16, pretrain_options="--lr 2e-3 --num-workers 1")
    pretrain = study.pretrain_config(cfg, "/r/work", "semisupcon-low", 2)
    assert isinstance(pretrain, PretrainConfig)
    assert (pretrain.root, pretrain.run_name, pretrain.seed) == ("/r/work", "study-semisupcon-low-s2", 2)
    assert (pretrain.width, pretrain.steps, pretrain.batch_size) == (0.5, 30, 16)
    assert (pretrain.lr, pretrain.num_workers) == (2e-3, 1)  # the pass-through options
    assert pretrain.p_pitch == PretrainConfig.p_pitch  # an option not given keeps the job's default

    tune = study.tune_config(
        study.StudyConfig(num_cpus=3, tune_options="--repetitions 2"), "/w", "m", local=True
    )
    assert isinstance(tune, TuneConfig) and (tune.root, tune.model_id, tune.repetitions) == ("/w", "m", 2)
    assert tune.max_concurrent == 3  # one trial per core of the study's own local Ray
    assert study.tune_config(study.StudyConfig(), "/w", "m", local=False).max_concurrent == 0  # the cluster's
    chosen = study.StudyConfig(tune_options="--max-concurrent 1")
    assert study.tune_config(chosen, "/w", "m", local=True).max_concurrent == 1  # the options decide


def test_the_study_refuses_a_pass_through_option_it_sets_itself():
    problems = study.option_problems(
        "pretrain", PretrainConfig, "--seed 3 --width 0.5 --nope 1", lambda: pytest.fail("built")
    )
    assert problems == [
        "--pretrain-options: --nope is not a pretrain option",
        "--pretrain-options: --seed is set by the study",
        "--pretrain-options: --width is set by the study",
    ]
    assert study.option_problems("tune", TuneConfig, "--repetitions 2", lambda: None) == []
    assert study.option_problems("embed", EmbedConfig, "--model-id m", None) == [
        "--embed-options: --model-id is set by the study"
    ]


def test_every_job_has_run_and_main_only_parses_and_runs():
    """Every job module has ``run(config)`` (the study and tests call it) and ``main(argv)``, which parses the
    config and returns ``run``'s result; none edits ``sys.path`` (jobs run as ``python -m jobs.<job>``)."""
    import ast
    import importlib
    import inspect

    project = Path(__file__).resolve().parents[1]
    names = sorted(p.stem for p in (project / "jobs").glob("*.py") if p.stem != "__init__")
    assert {"pretrain", "embed", "tune", "tag", "suggest", "index", "study"} <= set(names)
    for name in names:
        module = importlib.import_module(f"jobs.{name}")
        assert callable(getattr(module, "run", None)), name
        assert list(inspect.signature(module.run).parameters) == ["cfg"], name
        main = ast.parse(inspect.getsource(module.main)).body[0]
        assert len(main.body) == 1 and ".result" in ast.unparse(main.body[0]), name  # run(parse(...)).result
    for folder in ("jobs", "bench", "musiclib", "cluster"):
        for path in (project / folder).rglob("*.py"):
            assert "sys.path" not in path.read_text(), path


def test_work_catalog_points_at_the_same_audio_and_lists_the_labeled_tracks(tmp_path):
    rows = {
        "track_id": ["a", "b", "c"],
        "audio_uri": ["audio/a.wav", "/elsewhere/b.flac", "s3://bucket/c.mp3"],
        "tags": [["piano"], [], None],
        "split": ["train", "valid", None],
    }
    catalog.write(pa.table(rows), str(tmp_path / "root" / "catalog" / "tracks.parquet"))
    work = str(tmp_path / "work")

    study.copy_catalog(str(tmp_path / "root" / "catalog" / "tracks.parquet"), work)

    copied = catalog.read(config.Layout(work).catalog)
    assert copied["audio_uri"].to_pylist() == [
        str(tmp_path / "root" / "catalog" / "audio" / "a.wav"),
        "/elsewhere/b.flac",
        "s3://bucket/c.mp3",
    ]
    assert copied["track_id"].to_pylist() == ["a", "b", "c"]
    assert catalog.read(study.labeled_catalog(work))["track_id"].to_pylist() == ["a"]


@pytest.mark.slow
def test_tiny_study_writes_every_output(tmp_path):
    """Two encoders (CLMR through the pretrain job, the log-mel floor), one seed, two steps, a few tracks."""
    import ray

    from jobs import study as study_job
    from musiclib.datasets import demo

    root = str(tmp_path / "root")
    demo.make_catalog(root, n_tracks=24, labeled_fraction=1.0, min_seconds=3.0, max_seconds=4.0, workers=1)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        argv = ["--root", root, "--encoders", "clmr,logmel", "--seeds", "0", "--width", "0.0625"]
        argv += ["--steps", "2", "--batch-size", "8", "--max-chunks", "1"]
        argv += ["--pretrain-options", "--num-workers 1 --p-pitch 0 --log-every 1"]
        argv += [
            "--tune-options",
            "--budgets 1,all --probes logreg --norms l2 --c-grid 1 --repetitions 2 --max-concurrent 1",
        ]
        manifest = study_job.main(argv)
        assert study_job.main(argv).version == manifest.version  # complete: nothing runs again
    finally:
        ray.shutdown()
    dataset = storage.join(root, "study")
    out = versions.version_uri(dataset, manifest.version)
    rows = sorted(storage.list_files(storage.join(out, "work", "rows"), ".parquet"))
    assert [u.rsplit("/", 1)[-1] for u in rows] == ["clmr-s0.parquet", "logmel-s0.parquet"]
    written = [storage.file_checksum(u) for u in rows]
    storage.delete(versions.manifest_uri(dataset, manifest.version))  # as if killed before its publish
    storage.delete(storage.join(dataset, versions.LATEST))
    assert study_job.main(argv).version == manifest.version  # every variant written: none runs, no Ray
    assert [storage.file_checksum(u) for u in rows] == written
    results = storage.read_parquet([storage.join(out, "results.parquet")]).to_pandas()
    assert set(results["encoder"]) == {"clmr", "logmel"} and set(results["budget"]) == {"1", "all"}
    assert results["test_ap_all"].between(0, 1).all()
    text = storage.read_bytes(storage.join(out, "study.md")).decode()
    assert "| clmr |" in text and "| logmel |" in text and "study.png" in text
    assert storage.read_bytes(storage.join(out, "study.png")).startswith(b"\x89PNG")
    study.main(["study-plot", str(tmp_path / "study.png"), "--root", root])  # make docs-images
    assert (tmp_path / "study.png").read_bytes() == storage.read_bytes(storage.join(out, "study.png"))


@pytest.mark.slow
def test_the_study_runs_as_a_module():
    """``make study`` runs ``python -m jobs.study`` from the repository root: it imports the other jobs."""
    project = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, "-m", "jobs.study", "--help"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0 and "--encoders" in run.stdout, run.stdout + run.stderr
