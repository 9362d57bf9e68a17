"""Progress lines, Ray's console output and the end-of-job summaries (``musiclib.core.progress``)."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from musiclib.core import lifecycle, progress, storage, versions
from musiclib.core.config import Layout, parse
from musiclib.datasets import demo
from musiclib.tag import tags
from musiclib.train import models

ROOT_DIR = Path(__file__).resolve().parents[1]


def test_duration_and_eta():
    assert progress.duration(4.4) == "4 s"
    assert progress.duration(185) == "3m 05s"
    assert progress.duration(7620) == "2h 07m"
    assert progress.duration(float("nan")) == "?"
    assert progress.eta(40, 120, 2.0) == "40 s"
    assert progress.eta(10, 120, 0.0) == "?"


def test_throttle_first_then_every_interval_and_always_the_last():
    now = [0.0]
    throttle = progress.Throttle(every_s=30, clock=lambda: now[0])
    due = []
    for t in (0, 10, 29, 31, 45, 62, 63):
        now[0] = t
        due.append(throttle.due(final=t == 63))
    assert due == [True, False, False, True, False, True, True]


def test_progress_line():
    line = progress.progress_line("embed", 120, 300, "rows", 4.0, errors=2)
    assert line == "embed: 120/300 rows (40%) | 4.0 rows/s | ETA 45 s | errors 2"
    assert progress.progress_line("tag", 7, None, "rows", 1.0) == "tag: 7 rows | 1.0 rows/s"
    assert (
        progress.progress_line("tune", 1, 4, "trials", 0.02)
        == "tune: 1/4 trials (25%) | 1.2 trials/min | ETA 2m 30s"
    )


def test_data_warnings_prints_warnings_and_leaves_info_to_the_log_file():
    out = io.StringIO()
    logger = logging.getLogger("ray.data.test")
    logger.propagate = False
    logger.addHandler(progress.DataWarnings(out))
    logger.setLevel(logging.INFO)
    logger.info("ReadParquet: 100/300")
    logger.warning("something to see")
    logger.error("something broke")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "WARNING" in lines[0] and lines[0].endswith("something to see")
    assert "ERROR" in lines[1] and lines[1].endswith("something broke")


def test_summary_is_printed_written_and_tabled(tmp_path):
    root = str(tmp_path)
    out = io.StringIO()
    started = time.perf_counter() - 75
    record = progress.summary(
        "embed",
        root,
        started,
        read="300 catalog tracks",
        wrote="296 embeddings",
        skipped={"corrupt": 3, "empty": 1},
        outputs={"version": f"{root}/embeddings/m/v1"},
        out=out,
    )
    text = out.getvalue()
    assert text.startswith("== embed done in 1m 15s\n")
    assert "skipped  4 (corrupt 3, empty 1)" in text and f"version  {root}/embeddings/m/v1" in text
    assert json.loads((tmp_path / "summaries" / "embed.json").read_text()) == record
    progress.summary("tag", root, time.perf_counter(), read="x", wrote="10 tracks tagged", out=io.StringIO())
    runs = progress.read_summaries(root)
    assert [r["job"] for r in runs] == ["embed", "tag"]
    table = progress.chain_table(runs).splitlines()
    assert table[0].split() == ["job", "time", "skipped", "wrote"]
    assert table[1].split() == ["embed", "1m", "15s", "4", "296", "embeddings"]
    assert table[2].split() == ["tag", "0", "s", "0", "10", "tracks", "tagged"]
    assert table[3].split() == ["total", "1m", "15s"]


def test_a_job_ends_in_its_summary_and_returns_its_result(tmp_path, capsys):
    """``lifecycle.Job``: the summary printed and written once, the result handed back; a re-run whose
    version is committed ends in the "nothing written" summary with that version's manifest."""
    root = str(tmp_path)
    done = lifecycle.Job("index", root).done("v9", read="r", wrote="w", skipped={"corrupt": 2})
    assert done.result == "v9" and done.record["skipped"] == {"corrupt": 2}
    assert json.loads((tmp_path / "summaries" / "index.json").read_text()) == done.record
    assert "== index done in" in capsys.readouterr().out

    dataset = str(tmp_path / "index" / "m")
    assert lifecycle.Job("index", root).already_complete(dataset, "v1") is None  # not committed: run it
    uri = storage.join(versions.version_uri(dataset, "v1"), "index.safetensors")
    storage.write_bytes(uri, b"x")
    versions.publish(dataset, "v1", [uri], [1])
    again = lifecycle.Job("index", root).already_complete(dataset, "v1")
    assert again is not None and again.result.version == "v1"
    assert again.record["wrote"].startswith("nothing: version v1")
    assert json.loads((tmp_path / "summaries" / "index.json").read_text()) == again.record


def test_outputs_shows_the_chain_table(tmp_path, capsys):
    progress.summary("tune", str(tmp_path), time.perf_counter(), read="x", wrote="8 configurations")
    capsys.readouterr()
    with pytest.raises(SystemExit):  # no probe run and no tag version yet
        tags.main(["outputs", "--root", str(tmp_path)])
    assert "8 configurations" in capsys.readouterr().out

    layout = Layout(str(tmp_path))
    for dataset, version, name in (
        (layout.study, "study-1", "study.md"),
        (layout.suggestions, "s-1", "rows.parquet"),
    ):
        uri = storage.join(versions.version_uri(dataset, version), name)
        storage.write_bytes(uri, b"x")
        versions.publish(dataset, version, [uri], [1])
    with pytest.raises(SystemExit):
        tags.main(["outputs", "--root", str(tmp_path)])
    out = capsys.readouterr().out
    assert storage.join(layout.study, "study-1", "study.png") in out
    assert versions.version_uri(layout.suggestions, "s-1") in out


@dataclass
class _Small:
    n: int = 1


def test_verbose_is_a_flag_of_every_job(monkeypatch):
    monkeypatch.delenv(progress.VERBOSE_ENV, raising=False)
    assert parse(_Small, ["--n", "2"]).n == 2 and not progress.verbose()
    assert parse(_Small, ["--verbose", "--n", "3"]).n == 3 and progress.verbose()


def test_quiet_ray_replaces_the_console_handler_of_ray_data(monkeypatch):
    monkeypatch.delenv(progress.VERBOSE_ENV, raising=False)
    logger = logging.getLogger("ray.data")
    saved = list(logger.handlers)
    try:
        assert progress.quiet_ray() == logging.WARNING
        kinds = [type(h).__name__ for h in logger.handlers]
        assert kinds.count("DataWarnings") == 1 and all(h.get_name() != "console" for h in logger.handlers)
        assert any("FileHandler" in k for k in kinds)  # the detail still goes to Ray Data's log file
        monkeypatch.setenv(progress.VERBOSE_ENV, "1")
        assert progress.quiet_ray() == logging.INFO
    finally:
        logger.handlers[:] = saved


INJECT = """
import logging, sys
import ray
from jobs import embed

@ray.remote
def warn_in_a_worker():
    logging.getLogger("musiclib.test").warning("INJECTED worker warning")

real_build = embed.build_pipeline

def build_pipeline(*args, **kwargs):
    ray.get(warn_in_a_worker.remote())
    logging.getLogger("ray.data.test").warning("INJECTED ray data warning")
    return real_build(*args, **kwargs)

embed.build_pipeline = build_pipeline
embed.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_a_job_prints_few_lines_and_every_warning(tmp_path):
    """embed on a small catalog, stdout not a terminal (as in ``make logs``): a line budget, every warning."""
    root = str(tmp_path / "demo")
    demo.make_catalog(root, n_tracks=12, faults=True, min_seconds=3.0, max_seconds=4.0, workers=1)
    models.export_random_encoder(Layout(root).models, models.EncoderConfig(width=0.0625))
    env = {**os.environ, "PYTHONPATH": str(ROOT_DIR)}
    env.pop(progress.VERBOSE_ENV, None)
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run(
        [sys.executable, "-c", INJECT, "--root", root, "--batch-size", "4", "--max-chunks", "2"],
        cwd=ROOT_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    lines = out.splitlines()
    assert len(lines) < 40, out
    assert any("INJECTED ray data warning" in line for line in lines), out
    assert any("INJECTED worker warning" in line for line in lines), out
    assert any(line.startswith("== embed done in") for line in lines), out
    assert not any("Reporting training result" in line or "Total Progress" in line for line in lines), out


READ = """
import sys
import ray
from musiclib.core import ray_env

ray.init(address="local", num_cpus=2, include_dashboard=False)
print("rows", ray_env.read_parquet(sys.argv[1], ["a"]).count())
"""


@pytest.mark.slow
def test_parquet_read_draws_no_bar_in_a_log(tmp_path):
    """Ray Data's Parquet reader samples files under a tqdm bar: a log file must not get its carriage returns."""
    for i in range(3):
        pq.write_table(pa.table({"a": list(range(10))}), tmp_path / f"part-{i}.parquet")
    run = subprocess.run(
        [sys.executable, "-c", READ, str(tmp_path)],
        cwd=ROOT_DIR,
        env={**os.environ, "PYTHONPATH": str(ROOT_DIR)},
        capture_output=True,
        timeout=300,
    )
    out = (run.stdout + run.stderr).decode()  # bytes: text mode would turn the carriage returns into newlines
    assert run.returncode == 0 and "rows 30" in out, out
    assert "\r" not in out and "Parquet dataset sampling" not in out, out
