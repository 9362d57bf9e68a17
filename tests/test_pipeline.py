"""The whole pipeline, reduced: demo catalog → pretrain → embed → tune → tag, on one local Ray."""

from __future__ import annotations

import pyarrow.compute as pc
import pytest

from jobs import embed, pretrain
from jobs import tag as tag_job
from jobs import tune as tune_job
from musiclib import catalog, embedder, models, tag_table, tags
from musiclib.config import Layout
from musiclib.datasets import demo
from musiclib.tag_table import Where


@pytest.mark.slow
def test_demo_chain_end_to_end(tmp_path, capsys, monkeypatch):
    """Run as ``make demo`` does: a relative root, from the folder it is relative to."""
    import ray

    layout = Layout(str(tmp_path / "demo"))
    demo.make_catalog(
        layout.root,
        n_tracks=40,
        faults=True,
        labeled_fraction=1.0,
        min_seconds=3.0,
        max_seconds=5.0,
        workers=1,
    )
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)  # workers import jobs from here
    monkeypatch.chdir(tmp_path)
    root = "demo"
    try:
        model_id = pretrain.main(
            ["--root", root, "--width", "0.0625", "--num-workers", "2", "--batch-size", "8", "--steps", "4"]
            + ["--checkpoint-every", "4", "--log-every", "2", "--p-pitch", "0"]
        )
        embed.main(["--root", root, "--batch-size", "8", "--max-chunks", "2"])
        tune_job.main(
            ["--root", root, "--budgets", "2,all", "--probes", "logreg,centroid", "--norms", "l2"]
            + ["--c-grid", "1", "--repetitions", "2"]
        )
        tag_job.main(["--root", root])
    finally:
        ray.shutdown()

    assert models.resolve(layout.models) == model_id
    cat = catalog.read(layout.catalog, columns=["track_id", "tags", "fault"])
    good = set(cat.filter(pc.is_null(cat["fault"]))["track_id"].to_pylist())
    emb = embedder.read(layout.embeddings, model_id, columns=["track_id", "error"])
    assert sorted(emb["track_id"].to_pylist()) == sorted(cat["track_id"].to_pylist())

    iceberg = tag_table.require_table(Where(layout.root))
    assert tag_table.verify(iceberg) == []
    table = tag_table.read(iceberg)
    model_rows = table.filter(pc.equal(table["source"], "model"))
    assert set(model_rows["track_id"].to_pylist()) == good
    human = table.filter(pc.equal(table["source"], "human"))
    expected = {(t, tag) for t, ts in zip(cat["track_id"].to_pylist(), cat["tags"].to_pylist()) for tag in ts}
    assert set(zip(human["track_id"].to_pylist(), human["tag"].to_pylist())) == expected
    errors = tags.read_errors(iceberg)
    assert set(errors["track_id"].to_pylist()) == set(cat["track_id"].to_pylist()) - good

    tags.main(["outputs", "--root", root])
    out = capsys.readouterr().out
    assert "report.md" in out and "budget_curve.png" in out and "tag table" in out
