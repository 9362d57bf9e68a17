"""The tune job end to end on a small synthetic catalog: outputs, best configuration per budget, resume."""

from __future__ import annotations

import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from musiclib import fewshot, probes, storage
from musiclib.config import ConfigError, Layout

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from jobs import tune_probes  # noqa: E402

MODEL = "synthetic-m1"
SMALL = [
    "--budgets", "2,all", "--probes", "logreg,linear,centroid", "--norms", "standardize",
    "--c-grid", "1", "--epochs", "60", "--repetitions", "2", "--tolerance", "0.05",
]  # fmt: skip


def write_root(root: str, n_tracks: int = 240, **kwargs) -> tuple[pa.Table, pa.Table]:
    """A synthetic catalog, its embeddings of ``MODEL`` and the latest-model pointer under ``root``."""
    return fewshot.write_synthetic_root(
        root, MODEL, n_tracks=n_tracks, n_errors=3, n_tags=8, dim=16, **kwargs
    )


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_config_is_validated_before_any_work(tmp_path):
    for argv in (["--budgets", "0"], ["--probes", "svm"], ["--norms", "zca"], ["--repetitions", "0"]):
        with pytest.raises(ConfigError):
            tune_probes.main(["--root", str(tmp_path), *argv])
    root = str(tmp_path / "r")
    write_root(root, n_tracks=80)
    with pytest.raises(ConfigError, match="no training labels for jazz"):
        tune_probes.main(["--root", root, "--tags", "jazz"])
    with pytest.raises(storage.StorageError):
        tune_probes.main(["--root", str(tmp_path / "empty")])


def test_trial_slots_are_cores_on_a_local_ray_and_cpus_on_a_cluster():
    cfg = tune_probes.TuneConfig(num_cpus=2)
    assert tune_probes.trial_slots(cfg, local=True, cluster_cpus=4) == 2  # local Ray advertises >= 4
    assert tune_probes.trial_slots(cfg, local=False, cluster_cpus=64) == 64
    assert tune_probes.trial_slots(tune_probes.TuneConfig(max_concurrent=3), local=True, cluster_cpus=4) == 3


def test_trials_hold_every_configuration_once_longest_first():
    configs = tune_probes.configurations(tune_probes.TuneConfig(budgets=["1", "all"]))
    groups = tune_probes.group_by_trial(configs)
    assert sorted(fewshot.trial_key(c) for g in groups for c in g) == sorted(map(fewshot.trial_key, configs))
    assert all(len(g) == len(probes.NORMS) and len({c["probe"] for c in g}) == 1 for g in groups)
    order = [g[0]["probe"] for g in groups]
    assert order == sorted(order, key=tune_probes.LONGEST_FIRST.index) and order[0] == "logreg"


def test_small_sweep_writes_every_output_and_resumes(tmp_path, ray_local):
    root = str(tmp_path / "root")
    write_root(root)
    manifest = tune_probes.main(["--root", root, *SMALL])
    layout = Layout(root)
    run_id = manifest.version
    run_dir = storage.version_uri(layout.probes, run_id)
    assert storage.latest_version(layout.probes) == run_id
    assert {f.path.split("/")[-1] for f in manifest.files} == {
        "results.parquet", "report.md", "budget_curve.png", "probe_set.safetensors",
    }  # fmt: skip

    results = pq.read_table(storage.join(run_dir, "results.parquet")).to_pandas()
    n_configs = 2 * 3
    assert results["trial"].nunique() == n_configs
    reps = results.groupby("trial")["rep"].nunique()
    assert (reps[results.groupby("trial")["budget"].first() != "all"] == 2).all()
    assert results.groupby("trial")["tag"].nunique().eq(8).all()
    full = results[results["budget"] == "all"]
    assert full["roc_auc"].mean() > 0.9  # label-correlated embeddings

    text = open(storage.join(run_dir, "report.md")).read()
    assert "## Best configuration per budget" in text and "Tune overhead" in text
    for budget in ("2", "all"):
        assert any(line.startswith(f"| {budget} | ") and " / " in line for line in text.splitlines())
    assert "Cheapest budget within 0.05" in text and "excluded tracks: 3" in text
    assert open(storage.join(run_dir, "budget_curve.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    probe_set = probes.ProbeSet.load(storage.join(run_dir, "probe_set.safetensors"))
    assert probe_set.model_id == MODEL and len(probe_set.tags) == 8 and probe_set.thresholds is not None
    assert probe_set.config["probe_run_id"] == run_id

    # a finished run is a no-op; an interrupted one redoes only the missing trials
    assert tune_probes.main(["--root", root, *SMALL]).created_at == manifest.created_at
    storage.delete(storage.manifest_uri(layout.probes, run_id))
    trial_files = storage.list_files(storage.join(run_dir, "trials"), ".parquet")
    assert len(trial_files) == n_configs
    storage.delete(trial_files[0])
    mtimes = {u: os.path.getmtime(u) for u in trial_files[1:]}
    tune_probes.main(["--root", root, *SMALL])
    assert storage.exists(trial_files[0])
    assert all(os.path.getmtime(u) == t for u, t in mtimes.items())
    assert storage.read_manifest(layout.probes, run_id) is not None
