"""The whole pipeline, reduced: demo catalog → pretrain → embed → tune → tag, run as ``make demo`` runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.compute as pc
import pytest

from musiclib import catalog
from musiclib.core import progress
from musiclib.core.config import Layout
from musiclib.datasets import demo
from musiclib.embed import table as embeddings_table
from musiclib.tag import tag_table, tags
from musiclib.tag.tag_table import Where
from musiclib.train import models

ROOT_DIR = Path(__file__).resolve().parents[1]
LINE_BUDGET = 150  # the whole chain's console output without --verbose (issue: a person can follow it)

CHAIN = [
    ["-m", "jobs.pretrain", "--width", "0.0625", "--num-workers", "2", "--batch-size", "8", "--steps", "4"]
    + ["--checkpoint-every", "4", "--log-every", "2", "--p-pitch", "0"],
    ["-m", "jobs.embed", "--batch-size", "8", "--max-chunks", "2"],
    ["-m", "jobs.tune", "--budgets", "2,all", "--probes", "logreg,centroid", "--norms", "l2", "--c-grid", "1"]
    + ["--repetitions", "2"],
    ["-m", "jobs.tag"],
    ["-m", "musiclib.tag.tags", "outputs"],
]


def run_chain(cwd: Path, root: str) -> str:
    """Each job in its own process from ``cwd`` with the relative ``root``, stdout a pipe as in a log file."""
    env = {**os.environ, "PYTHONPATH": str(ROOT_DIR)}
    env.pop(progress.VERBOSE_ENV, None)
    env.pop("RAY_ADDRESS", None)
    out = ""
    for job in CHAIN:
        run = subprocess.run(
            [sys.executable, *job, "--root", root], cwd=cwd, env=env, capture_output=True, timeout=600
        )
        text = (run.stdout + run.stderr).decode()  # bytes: text mode would hide carriage returns
        assert run.returncode == 0, f"{job[1]} failed:\n{text}"
        out += text
    return out


@pytest.mark.slow
def test_demo_chain_end_to_end(tmp_path):
    """A relative root from the folder it is relative to; few lines; every job's summary; every track."""
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
    out = run_chain(tmp_path, "demo")

    lines = out.splitlines()
    assert len(lines) < LINE_BUDGET, out
    assert "\r" not in out, out
    for job in ("pretrain", "embed", "tune", "tag"):
        assert any(line.startswith(f"== {job} done in") for line in lines), out
    assert "report.md" in out and "budget_curve.png" in out and "tag table" in out
    assert not any("Reporting training result" in line or "Total Progress" in line for line in lines), out

    model_id = models.model_id_or_latest(layout.models, "")
    cat = catalog.read(layout.catalog, columns=["track_id", "tags", "fault"])
    good = set(cat.filter(pc.is_null(cat["fault"]))["track_id"].to_pylist())
    emb = embeddings_table.read(layout.embeddings, model_id, columns=["track_id", "error"])
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
