"""Fault injection: each job killed, its workers killed, its storage taken away, denied and throttled.

Every case runs a job the way an operator does (``python -m jobs.<job> ...`` in its own process, with its
own local Ray, or on a two-node Ray cluster for the loss of a node), injects one fault, and checks the
outcome against what an uninterrupted run gives: the same tracks, each exactly once, the same tags.
While a job writes, a ``Reader`` thread polls the dataset's latest committed version the way any
consumer would, and checks that every file it lists is there with the rows it claims. ``docs/RELIABILITY.md`` has one row per case.

Where a fault is injected at a random point, the point comes from ``random.Random`` seeded with
``MUSICLIB_FAULT_SEED`` (default below) and the case's name, so a failure is reproduced by running the
same test with the same seed; the assertion messages name the seed and the point.

    .venv/bin/python -m pytest -q tests/test_faults.py
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import pickle
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import SYNTHETIC_MODEL, publish_probe_set
from test_tag_table import rows as previous_rows
from test_tag_table import write_and_commit

from jobs import tag as tag_job
from musiclib import catalog
from musiclib.core import storage, versions
from musiclib.core.config import Layout, parse
from musiclib.datasets import demo, tagged_embeddings
from musiclib.embed import embedder
from musiclib.embed import table as embeddings_table
from musiclib.probe import fewshot, probes, sweep
from musiclib.tag import tag_table
from musiclib.tag.tag_table import Where
from musiclib.train import models
from musiclib.train.shards import committed_shards, read_shard_columns

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
SEED = int(os.environ.get("MUSICLIB_FAULT_SEED", "20240611"))
LEASE_MESSAGE = "being written by another run"

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------- helpers


def rng_for(case: str) -> random.Random:
    """The case's own random stream: the same seed and case always give the same fault point."""
    return random.Random(f"{SEED}:{case}")


def iceberg_args(tmp_path: Path) -> list[str]:
    """An Iceberg catalog of the test's own, for a job on an S3 root (whose default is under ``~``)."""
    return ["--catalog-uri", f"sqlite:///{tmp_path}/iceberg.db"]


def job_command(job: str, *args: str) -> list[str]:
    """A job as an operator runs it: ``python -m jobs.<job>``, started in the repository root (``start``)."""
    return [PY, "-m", f"jobs.{job}", *args]


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A job in its own session (so SIGKILL of its group takes its local Ray with it), logging to ``log``."""
    out = open(log, "ab")
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        start_new_session=True,
        stdout=out,
        stderr=subprocess.STDOUT,
        env=env or os.environ.copy(),
    )
    out.close()
    return proc


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> str:
    """Wait for a job; its log. A job still running at ``timeout`` is killed and the test fails."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill(proc)
        pytest.fail(f"{proc.args} did not finish in {timeout:.0f} s\n{tail(log)}")
    return log.read_text(errors="replace")


def run(cmd: list[str], log: Path, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    """Run a job to its end; its log. Fails the test unless it exits 0."""
    proc = start(cmd, log, env)
    text = finish(proc, log, timeout)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{tail(log)}"
    return text


def tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


def processes() -> dict[int, tuple[int, str]]:
    """Every live process: pid -> (parent pid, command line), from /proc (zombies left out)."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
            cmd = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        state, ppid = stat[stat.rfind(")") + 2 :].split()[:2]
        if state != "Z":
            found[int(name)] = (int(ppid), cmd.strip())
    return found


def descendants(pid: int) -> dict[int, str]:
    """The processes below ``pid`` (a job's local Ray: GCS, raylet, workers): pid -> command line."""
    procs, below, frontier = processes(), {}, {pid}
    while frontier:
        frontier = {p for p, (parent, _) in procs.items() if parent in frontier and p not in below}
        below |= {p: procs[p][1] for p in frontier}
    return below


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 1.0) -> None:
    """Poll ``condition`` every ``interval`` s until it holds; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


def kill(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGKILL a job's process group (the driver, its GCS and raylet), then wait for its Ray workers.

    Ray workers run in process groups of their own: they outlive the driver by a few seconds (measured:
    2-3 s) and may finish the file they were writing, then exit once their raylet is gone. Waiting for
    them makes what the killed run left behind final; one still alive after ``grace`` is killed too.
    """
    orphans = descendants(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + grace
    while (alive := set(orphans) & set(processes())) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def kill_when(
    proc: subprocess.Popen,
    ready: Callable[[], bool],
    rng: random.Random,
    max_delay: float,
    timeout: float = 300,
    min_delay: float = 0.0,
    cutoff: Callable[[], bool] = lambda: False,
) -> float:
    """SIGKILL the job's process group once ``ready()`` holds, after a seeded delay in ``[min_delay, max_delay]``,
    or at once when ``cutoff()`` holds first (the last point the kill must come before, on a fast machine).

    Returns the delay used. Fails the test when the job ends by itself first (nothing was interrupted).
    """
    delay = rng.uniform(min_delay, max_delay)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if ready():
                waited = time.monotonic()
                while time.monotonic() - waited < delay and not cutoff():
                    time.sleep(0.02)
                delay = time.monotonic() - waited
                break
            time.sleep(0.1)
    finally:
        exited_by_itself = proc.poll() is not None
        kill(proc)
    assert not exited_by_itself, f"the job exited ({proc.returncode}) before the fault point (seed {SEED})"
    return delay


def kill_ray_worker(
    proc: subprocess.Popen,
    log: Path,
    name: str,
    ready: Callable[[], bool] = lambda: True,
    timeout: float = 300,
) -> str:
    """SIGKILL the first ``ray::`` process of the job whose title contains ``name`` once ``ready()``; its title.

    Checks that the process really died. Fails the test when the job ends (or ``timeout`` passes) first.
    """
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        found = sorted(
            (p, cmd) for p, cmd in descendants(proc.pid).items() if cmd.startswith("ray::") and name in cmd
        )
        if found and ready():
            pid, title = found[0]
            os.kill(pid, signal.SIGKILL)
            gone_by = time.monotonic() + 30
            while pid in processes() and time.monotonic() < gone_by:
                time.sleep(0.05)
            assert pid not in processes(), f"{title} (pid {pid}) survived SIGKILL"
            return title
        time.sleep(0.05)
    pytest.fail(
        f"no {name} worker was killed: the job ended ({proc.returncode}) or timed out first\n{tail(log)}"
    )


# Ray Train's placement-group cleaner asks the State API for its controller without an address; when another
# Ray runs on the machine (a developer's study beside the tests) it finds two and its thread dies. That is
# Ray's own monitor, not a thread of the job.
RAY_NOISE_THREADS = ("PlacementGroupCleanerMonitor",)


def dead_threads(text: str) -> list[str]:
    """The threads a job's output says died (``Exception in thread NAME:``), Ray's known noise aside."""
    return [n for n in re.findall(r"Exception in thread (.*):\s*$", text, re.M) if n not in RAY_NOISE_THREADS]


def count_files(uri: str, suffix: str, exclude: str = "\0") -> Callable[[], int]:
    """How many files under ``uri`` end with ``suffix`` (and do not contain ``exclude``), as a callable."""

    def count() -> int:
        try:
            return sum(1 for u in storage.list_files(uri, suffix) if exclude not in u)
        except (storage.StorageError, OSError):
            return 0

    return count


class Reader(threading.Thread):
    """A consumer polling a dataset's latest committed version while a job runs.

    Each poll reads ``_latest`` and its manifest, then checks every listed file: it exists, has the
    manifest's size, and, for Parquet, the manifest's row count (from its footer). ``problems`` collects
    every mismatch; ``versions`` every version seen. A dataset without a committed version yet is fine.
    """

    def __init__(self, dataset: str, interval: float = 0.2):
        super().__init__(name=f"reader {dataset}", daemon=True)
        self.dataset, self.interval = dataset, interval
        self.stop = threading.Event()
        self.polls = 0
        self.versions: list[str] = []
        self.problems: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            self.poll()
            self.stop.wait(self.interval)

    def poll(self) -> None:
        if versions.latest_version(self.dataset) is None:
            return
        manifest = versions.read_latest_manifest(self.dataset)
        self.polls += 1
        if not self.versions or self.versions[-1] != manifest.version:
            self.versions.append(manifest.version)
        for entry, uri in zip(manifest.files, manifest.file_uris(), strict=True):
            fs, path = storage.filesystem(uri)
            if not fs.exists(path):
                self.problems.append(f"{manifest.version}: missing {entry.path}")
            elif fs.size(path) != entry.bytes:
                self.problems.append(
                    f"{manifest.version}: {entry.path} has {fs.size(path)} bytes, not {entry.bytes}"
                )
            elif uri.endswith(".parquet") and storage.parquet_rows(uri) != entry.rows:
                self.problems.append(f"{manifest.version}: {entry.path} rows differ from the manifest")

    def __enter__(self) -> Reader:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.join()
        self.poll()  # the final state too

    def check(self) -> None:
        assert not self.problems, f"a reader saw a partial version: {self.problems[:5]}"


class TagTableReader(Reader):
    """A ``Reader`` of the Iceberg tag table under a root: each poll loads the table afresh and checks its
    current snapshot's data files (``tag_table.verify``); ``versions`` are the runs seen."""

    def __init__(self, root: str, interval: float = 0.2):
        super().__init__(Layout(root).tags, interval)
        self.where = Where(root)

    def poll(self) -> None:
        table = tag_table.open_table(self.where)
        current = None if table is None else tag_table.current_run(table)
        if current is None:
            return
        self.polls += 1
        if not self.versions or self.versions[-1] != current.run_id:
            self.versions.append(current.run_id)
        self.problems += [f"{current.run_id}: {p}" for p in tag_table.verify(table, current.snapshot_id)]


def assert_same_rows(got: pa.Table, expected: pa.Table, keys: list[str], values: list[str]) -> None:
    """The same rows, each key once: keys equal, values equal to float32 precision."""
    a, b = (
        t.select(keys + values).to_pandas().sort_values(keys).reset_index(drop=True) for t in (got, expected)
    )
    assert not a.duplicated(keys).any(), "duplicate rows"
    assert a[keys].equals(b[keys]), "different rows"
    np.testing.assert_allclose(a[values].to_numpy(float), b[values].to_numpy(float), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- roots


def audio_root(root: str, n_tracks: int = 6, faults: bool = True) -> str:
    """A demo catalog of short tracks (plus one per decoder fault) and a narrow random encoder; its model id."""
    demo.make_catalog(root, n_tracks=n_tracks, faults=faults, min_seconds=3.0, max_seconds=5.0, workers=1)
    return models.export_random_encoder(Layout(root).models, models.EncoderConfig(width=0.0625))


EMBED_ARGS = ["--batch-size", "2", "--shard-rows", "1", "--max-chunks", "2"]


def uninterrupted_embeddings(root: str, model_id: str) -> pa.Table:
    """What an uninterrupted run embeds: the plain single-process loop over the catalog (no Ray)."""
    encoder, _ = models.load_encoder(Layout(root).models, model_id)
    return embedder.embed_catalog(Layout(root).catalog, encoder, model_id, max_chunks=2)[0]


def check_embeddings(root: str, model_id: str, expected: pa.Table) -> pa.Table:
    """The latest embeddings hold every catalog track exactly once, with the uninterrupted run's values."""
    out = embeddings_table.read(Layout(root).embeddings, model_id)
    ids = out["track_id"].to_pylist()
    assert len(ids) == len(set(ids)), "duplicate tracks"
    cat = catalog.read(Layout(root).catalog, columns=["track_id"])["track_id"].to_pylist()
    assert sorted(ids) == sorted(cat), f"lost tracks: {sorted(set(cat) - set(ids))}"
    got = {r["track_id"]: r for r in out.to_pylist()}
    for row in expected.to_pylist():
        assert got[row["track_id"]]["error"] == row["error"], row["track_id"]
        if row["error"] is None:
            np.testing.assert_allclose(
                got[row["track_id"]]["embedding"], row["embedding"], rtol=1e-4, atol=1e-5
            )
    return out


# --------------------------------------------------------------------------- driver killed, run again


def pretrain_command(tmp_path: Path, *args: str, root: str = "") -> tuple[str, list[str]]:
    """A fully labeled 8-track demo root (``root``, default a folder of ``tmp_path``) and a pretrain command
    on it: one narrow worker, a checkpoint every 4 steps; ``args`` adds the steps and any other option
    (an option given again in ``args`` overrides the one here)."""
    root = root or str(tmp_path / "root")
    demo.make_catalog(root, n_tracks=8, labeled_fraction=1.0, min_seconds=3.0, max_seconds=5.0, workers=1)
    cmd = job_command(
        "pretrain", "--root", root, "--width", "0.0625", "--num-workers", "1", "--batch-size", "4",
        "--checkpoint-every", "4", "--log-every", "4", "--p-pitch", "0", "--shard-tracks", "2",
        "--keep-checkpoints", "2", *args,
    )  # fmt: skip
    return root, cmd


def check_shards(layout: Layout) -> None:
    """The committed training shards hold every train track of the catalog exactly once."""
    shard_ids = read_shard_columns(committed_shards(layout.shards), ["track_id"])["track_id"].to_pylist()
    cat = catalog.read(layout.catalog, columns=["track_id", "split"])
    train = cat.filter(pc.equal(cat["split"], "train"))["track_id"].to_pylist()
    assert len(shard_ids) == len(set(shard_ids)) and sorted(shard_ids) == sorted(train)


def test_pretrain_driver_killed_after_a_checkpoint_resumes_from_it(tmp_path):
    """SIGKILL the pretrain driver once its 1st or 2nd checkpoint is registered, after a seeded delay of up
    to 1 s, or at once when a checkpoint past half the steps is; the same command resumes from the saved
    step (not step 0), reaches the last step and exports; the shards hold every train track once."""
    root, cmd = pretrain_command(tmp_path, "--steps", "40")
    layout = Layout(root)
    rng = rng_for("pretrain-driver")
    after = rng.randint(1, 2)
    proc = start(cmd, tmp_path / "killed.log")
    kill_when(
        proc,
        lambda: len(registered_steps(layout)) >= after,
        rng,
        max_delay=1.0,
        timeout=400,
        cutoff=lambda: max(registered_steps(layout), default=0) >= 20,
    )
    assert versions.latest_version(layout.models) is None, "exported before the kill"
    assert registered_steps(layout), tail(tmp_path / "killed.log")

    run(cmd, tmp_path / "again.log", timeout=400)
    model_id = models.model_id_or_latest(layout.models)
    card = storage.read_json(storage.join(layout.models, model_id, "card.json"))
    assert card["steps"] == 40 and card["metrics"]["start_step"] >= 4, (SEED, after, card["metrics"])
    check_shards(layout)


def registered_steps(layout: Layout) -> list[int]:
    """The steps of the checkpoints Ray Train's controller has registered and kept for the pretrain run
    (its snapshot file; none before one exists).

    A checkpoint folder on storage counts for a restart only once the controller has registered the
    worker's report: a worker or driver killed in between restarts from the previous registered one.
    """
    try:
        snapshot = storage.read_json(
            storage.join(layout.runs, "pretrain", "checkpoint_manager_snapshot.json")
        )
        return [r["metrics"]["step"] for r in snapshot["checkpoint_results"]]
    except (storage.StorageError, OSError, ValueError, KeyError):
        return []


def test_pretrain_survives_a_killed_train_worker(tmp_path):
    """SIGKILL the Ray Train worker once a checkpoint is registered: the same command (``--max-failures``)
    starts a new worker from the latest checkpoint, reaches the last step and exports; every train track
    once."""
    root, cmd = pretrain_command(tmp_path, "--steps", "24", "--max-failures", "2")
    layout = Layout(root)
    log = tmp_path / "pretrain.log"
    proc = start(cmd, log)
    try:
        killed = kill_ray_worker(proc, log, "RayTrainWorker", lambda: bool(registered_steps(layout)), 400)
        text = finish(proc, log, timeout=400)
    finally:
        kill(proc)
    assert proc.returncode == 0, f"failed after killing {killed}\n{text[-4000:]}"
    card = storage.read_json(
        storage.join(layout.models, models.model_id_or_latest(layout.models), "card.json")
    )
    assert card["steps"] == 24 and card["metrics"]["start_step"] >= 4, card["metrics"]  # resumed, not step 0
    check_shards(layout)


def test_pretrain_goes_on_with_fewer_workers_after_losing_a_node(tmp_path, monkeypatch):
    """A two-node Ray cluster (``ray.cluster_utils.Cluster``: two raylets on this machine, 2 CPUs each) and
    an elastic run of two 2-CPU workers, one per node (``--min-workers 1``). Once a checkpoint is
    registered the second node is killed; the run starts again from the checkpoint on the one worker the
    head can hold, reaches the last step and exports; every train track once."""
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "20")  # the try at the old size; Ray's: 60 s
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    try:
        node = cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        elastic = ["--num-workers", "2", "--min-workers", "1", "--cpus-per-worker", "2"]
        root, cmd = pretrain_command(tmp_path, "--steps", "24", *elastic, "--ray-address", cluster.address)
        layout = Layout(root)
        log = tmp_path / "pretrain.log"
        proc = start(cmd, log)
        try:
            wait_for(
                lambda: bool(registered_steps(layout)) or proc.poll() is not None,
                300,
                "a registered checkpoint",
                interval=0.1,
            )
            assert proc.poll() is None and registered_steps(layout), tail(log)
            cluster.remove_node(node, allow_graceful=False)
            text = finish(proc, log, timeout=400)
        finally:
            kill(proc)
    finally:
        cluster.shutdown()
    assert proc.returncode == 0, text[-4000:]
    assert "worker 0 of 2:" in text and "worker 0 of 1:" in text.split("worker 0 of 2:")[-1], text[-4000:]
    card = storage.read_json(
        storage.join(layout.models, models.model_id_or_latest(layout.models), "card.json")
    )
    assert card["steps"] == 24 and card["metrics"]["start_step"] >= 4, card["metrics"]
    check_shards(layout)


TUNE_ARGS = [
    "--budgets",
    "1,2,5,10,20,all",
    "--probes",
    "logreg,linear,centroid",
    "--norms",
    "standardize,l2",
    "--c-grid",
    "1",
    "--epochs",
    "60",
    "--repetitions",
    "2",
    "--num-cpus",
    "2",
]  # fmt: skip  (36 trials: on an idle machine 9 were all written within the kill's delay)


def synthetic_root(root: str, n_files: int = 1) -> tuple[pa.Table, pa.Table]:
    """The data ``write_synthetic_root`` (conftest) writes, with the embeddings in ``n_files`` shards: a tag
    task per shard, for the cases that kill one."""
    cat, emb = tagged_embeddings.make(
        n_tracks=240, n_tags=8, dim=16, n_errors=3, seed=0, model_id=SYNTHETIC_MODEL
    )
    layout = Layout(root)
    catalog.write(cat, layout.catalog)
    dataset = embeddings_table.dataset_uri(layout.embeddings, SYNTHETIC_MODEL)
    bounds = np.linspace(0, len(emb), n_files + 1).astype(int)
    files = [
        storage.join(versions.version_uri(dataset, "v1"), f"part-{i:03d}.parquet") for i in range(n_files)
    ]
    rows = [storage.write_parquet(emb.slice(a, b - a), f) for f, a, b in zip(files, bounds, bounds[1:])]
    versions.publish(dataset, "v1", files, rows)
    versions.publish(layout.models, SYNTHETIC_MODEL, [], [])
    return cat, emb


def publish_previous(dataset: str, version: str) -> None:
    """An earlier committed version, so that a reader has something to read from the start."""
    uri = storage.join(versions.version_uri(dataset, version), "note.parquet")
    versions.publish(dataset, version, [uri], [storage.write_parquet(pa.table({"note": ["earlier"]}), uri)])


def test_tune_driver_killed_after_a_trial_resumes_to_the_same_results(tmp_path):
    """SIGKILL the tune driver once 1-3 of its 36 trial files exist; the same command skips them and
    publishes the results an uninterrupted sweep computes. A reader never sees a partial run."""
    root = str(tmp_path / "root")
    synthetic_root(root)
    layout = Layout(root)
    publish_previous(layout.probes, "tune-previous")
    rng = rng_for("tune-driver")
    after = rng.randint(1, 3)
    cmd = job_command("tune", "--root", root, "--run-id", "tune-killed", *TUNE_ARGS)
    trials = count_files(
        storage.join(versions.version_uri(layout.probes, "tune-killed"), "trials"), ".parquet"
    )
    with Reader(layout.probes) as reader:
        proc = start(cmd, tmp_path / "killed.log")
        kill_when(proc, lambda: trials() >= after, rng, max_delay=0.5)
        written = trials()
        assert versions.read_manifest(layout.probes, "tune-killed") is None, "published before the kill"
        n_trials = len(sweep.configurations(tune_config(root)[0]))
        assert 0 < written < n_trials, f"seed {SEED}: {written} of {n_trials} trial files at the kill"
        text = run(cmd, tmp_path / "again.log")
    reader.check()
    assert f"{written} already done" in text
    assert reader.versions == ["tune-previous", "tune-killed"]
    check_tune_results(root, "tune-killed")


DIRECT_TRIALS: dict[str, list[dict]] = {}


def direct_trials(data: fewshot.ProbeData, cfg: sweep.TuneConfig) -> list[dict]:
    """Every trial of the sweep computed directly (``fewshot.run_config``, no Tune). The tune cases sweep
    the same data with the same configurations: each distinct input (data, configurations, repetitions,
    seed; by the digest of its pickle) is computed once."""
    configs = sweep.configurations(cfg)
    key = hashlib.sha256(pickle.dumps((data, configs, cfg.repetitions, cfg.seed))).hexdigest()
    if key not in DIRECT_TRIALS:
        DIRECT_TRIALS[key] = [
            r for c in configs for r in fewshot.run_config(data, c, cfg.repetitions, cfg.seed)
        ]
    return DIRECT_TRIALS[key]


def tune_config(root: str) -> tuple[sweep.TuneConfig, fewshot.ProbeData]:
    """The tune cases' config, narrowed as the job narrows it to the representations the synthetic
    embeddings offer, and the data it reads."""
    cfg = parse(sweep.TuneConfig, ["--root", root, *TUNE_ARGS])
    data = sweep.load_data(cfg, Layout(root), SYNTHETIC_MODEL)
    return sweep.narrow(cfg, data), data


def check_tune_results(root: str, run_id: str) -> None:
    """The run's published results equal the trials computed directly from the data it read."""
    layout = Layout(root)
    cfg, data = tune_config(root)
    rows = direct_trials(data, cfg)
    manifest = versions.read_manifest(layout.probes, run_id)
    results = storage.read_parquet([u for u in manifest.file_uris() if u.endswith("results.parquet")])
    keys, values = ["trial", "rep", "tag", "n_support"], ["valid_ap", "test_ap", "valid_roc_auc"]
    assert_same_rows(results, pa.Table.from_pylist(rows), keys, values)


def run_killing_workers(cmd: list[str], log: Path, reader: Reader, workers: list[str]) -> list[str]:
    """Run a job and SIGKILL one Ray worker process of each name in ``workers``, in turn, while it runs; the
    job must still succeed. Returns the versions ``reader`` saw while polling (it never saw a partial
    one)."""
    proc = start(cmd, log)
    with reader:
        try:
            killed = [kill_ray_worker(proc, log, name) for name in workers]
            text = finish(proc, log)
        finally:
            kill(proc)
    reader.check()
    assert proc.returncode == 0, f"failed after killing {killed}\n{text[-4000:]}"
    return reader.versions


def test_tune_survives_a_trial_worker_killed_mid_trial(tmp_path):
    """SIGKILL a Tune trial's worker while it runs a trial: Tune runs the trial again (``--max-failures``),
    the job finishes, and its results equal the trials computed directly."""
    root = str(tmp_path / "root")
    synthetic_root(root)
    layout = Layout(root)
    log = tmp_path / "tune.log"
    cmd = job_command("tune", "--root", root, "--run-id", "tune-worker", *TUNE_ARGS)
    assert run_killing_workers(cmd, log, Reader(layout.probes), ["ImplicitFunc.train"]) == ["tune-worker"]
    check_tune_results(root, "tune-worker")


def commit_previous_tags(root: str, catalog_uri: str = "") -> None:
    """An earlier snapshot of the tag table (run ``tags-previous``), so that a reader has one from the start."""
    write_and_commit(Where(root, catalog_uri), "tags-previous", previous_rows("tags-previous", 2))


def test_tag_driver_killed_mid_run_gives_the_same_tags(tmp_path):
    """SIGKILL the tag driver a seeded 2-8 s after it takes its lease (during Ray's start), or as soon as its
    first scored file appears, whichever comes first; the same command takes the dead run's lease over,
    writes the run again and commits it, and its tags equal the probe set applied to every embedding.
    A reader never sees a partial snapshot."""
    root = str(tmp_path / "root")
    cat, emb = synthetic_root(root, n_files=6)
    probe_set = publish_probe_set(root, cat, emb)
    layout = Layout(root)
    commit_previous_tags(root)
    rng = rng_for("tag-driver")
    cmd = job_command("tag", "--root", root, "--run-id", "tags-killed", "--batch-size", "8")
    lease = storage.join(layout.tags, versions.LEASE)
    run_dir = tag_table.run_dir(tag_table.require_table(Where(root)), "tags-killed")
    scored = count_files(storage.join(run_dir, "model"), ".parquet")
    with TagTableReader(root) as reader:
        proc = start(cmd, tmp_path / "killed.log")
        delay = kill_when(
            proc,
            lambda: storage.exists(lease),
            rng,
            min_delay=2.0,
            max_delay=8.0,
            cutoff=lambda: scored() > 0,
        )
        assert tag_table.find_run(tag_table.require_table(Where(root)), "tags-killed") is None, (
            f"seed {SEED}: committed before the kill {delay:.1f} s after the lease"
        )
        run(cmd, tmp_path / "again.log")
    reader.check()
    assert reader.versions == ["tags-previous", "tags-killed"]
    check_tags(root, cat, emb, probe_set)


def check_tags(
    root: str, cat: pa.Table, emb: pa.Table, probe_set: probes.ProbeSet, catalog_uri: str = ""
) -> None:
    """The current tags: the probe set applied to every embedding once, and the human labels once."""
    table = tag_table.read(tag_table.require_table(Where(root, catalog_uri)))
    model = table.filter(pc.equal(table["source"], "model"))
    ok = emb.filter(pc.is_null(emb["error"]))
    scores = probe_set.apply(np.array(ok["embedding"].to_pylist(), np.float32))
    n_tags = len(probe_set.tags)
    expected = pa.table(
        {
            "track_id": np.repeat(ok["track_id"].to_numpy(zero_copy_only=False), n_tags),
            "tag": probe_set.tags * len(ok),
            "score": scores.ravel(),
            "predicted": (scores >= probe_set.thresholds).ravel(),
        }
    )
    assert_same_rows(model, expected, ["track_id", "tag"], ["score", "predicted"])
    human = table.filter(pc.equal(table["source"], "human"))
    labels = {(t, g) for t, gs in zip(cat["track_id"].to_pylist(), cat["tags"].to_pylist()) for g in gs}
    pairs = list(zip(human["track_id"].to_pylist(), human["tag"].to_pylist()))
    assert len(pairs) == len(labels) and set(pairs) == labels


def test_tag_survives_a_killed_scoring_task(tmp_path):
    """SIGKILL a tag task (``ReadParquet->MapBatches(counted_model_rows)``: read, score and write one embedding
    file) while it runs: Ray runs the task again, which rewrites the same file, and the job finishes with
    every track's tags once. A reader polls throughout."""
    root = str(tmp_path / "root")
    cat, emb = synthetic_root(root, n_files=6)
    probe_set = publish_probe_set(root, cat, emb)
    log = tmp_path / "tag.log"
    cmd = job_command("tag", "--root", root, "--run-id", "tags-task", "--batch-size", "1")
    assert run_killing_workers(cmd, log, TagTableReader(root), ["counted_model_rows"]) == ["tags-task"]
    check_tags(root, cat, emb, probe_set)


def test_tag_run_refuses_while_another_run_writes_the_tags(tmp_path, monkeypatch):
    """Two tag runs of the same inputs write the same run folder (``write_run`` first deletes it), so
    the second must fail at once, as embed does. Here the first run is this test holding the lease."""
    root = str(tmp_path / "root")
    cat, emb = synthetic_root(root)
    publish_probe_set(root, cat, emb)

    def unguarded(*args, **kwargs):
        raise AssertionError("the tag job started writing while another run held the lease")

    monkeypatch.setattr(tag_job, "ray_session", lambda *args, **kwargs: contextlib.nullcontext(False))
    monkeypatch.setattr(tag_job, "write_run", unguarded)
    with versions.lease(Layout(root).tags), pytest.raises(versions.LeaseHeld, match=LEASE_MESSAGE):
        tag_job.main(["--root", root])


# --------------------------------------------------------------------------- embed: workers, concurrency


def test_embed_survives_killed_decode_worker_and_encoder_actor(tmp_path):
    """SIGKILL a decode task's worker, then the encoder actor's, mid-run: Ray retries the task and restarts
    the actor; every track is embedded exactly once with the uninterrupted values. A reader polls throughout."""
    root = str(tmp_path / "root")
    model_id = audio_root(root, n_tracks=8)
    dataset = embeddings_table.dataset_uri(Layout(root).embeddings, model_id)
    proc = start(job_command("embed", "--root", root, "--actors", "1", *EMBED_ARGS), tmp_path / "embed.log")
    killed: list[str] = []
    checkpoints = count_files(storage.join(dataset, embedder.CHECKPOINTS), ".parquet", exclude=".pending.")
    with Reader(dataset) as reader:
        try:
            for name, ready in (("decode_batch", lambda: True), ("EncoderActor", lambda: checkpoints() >= 1)):
                deadline = time.monotonic() + 300
                while proc.poll() is None and time.monotonic() < deadline:
                    found = [
                        p
                        for p, cmd in descendants(proc.pid).items()
                        if cmd.startswith("ray::") and name in cmd
                    ]
                    if found and ready():
                        os.kill(found[0], signal.SIGKILL)
                        killed.append(name)
                        break
                    time.sleep(0.05)
            text = finish(proc, tmp_path / "embed.log")
        finally:
            kill(proc)
    reader.check()
    assert killed == ["decode_batch", "EncoderActor"], f"killed only {killed}\n{tail(tmp_path / 'embed.log')}"
    assert proc.returncode == 0, text[-4000:]
    check_embeddings(root, model_id, uninterrupted_embeddings(root, model_id))
    assert reader.versions == [versions.latest_version(dataset)]


def test_two_embed_runs_of_one_model_one_works_one_fails_at_once(tmp_path):
    """Start the same embed command twice together: the lease lets one write; the other fails with a clear
    message, without waiting for the first; the output is complete."""
    root = str(tmp_path / "root")
    model_id = audio_root(root, n_tracks=4, faults=False)
    cmd = job_command("embed", "--root", root, "--actors", "1", *EMBED_ARGS)
    began = time.monotonic()
    procs = [start(cmd, tmp_path / f"run{i}.log") for i in range(2)]
    ended = {}
    while len(ended) < 2 and time.monotonic() - began < 300:
        for i, p in enumerate(procs):
            if i not in ended and p.poll() is not None:
                ended[i] = time.monotonic() - began
        time.sleep(0.1)
    for p in procs:
        kill(p)
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 1], codes
    loser = codes.index(1)
    assert LEASE_MESSAGE in tail(tmp_path / f"run{loser}.log"), tail(tmp_path / f"run{loser}.log")
    assert ended[loser] < ended[1 - loser], ended  # it did not wait for the winner
    check_embeddings(root, model_id, uninterrupted_embeddings(root, model_id))


# --------------------------------------------------------------------------- embed: S3 faults (SeaweedFS)


def embed_env(endpoint: str | None = None) -> dict[str, str]:
    env = os.environ.copy()
    if endpoint:
        env["AWS_ENDPOINT_URL"] = endpoint
    return env


def endpoint_answers(endpoint: str) -> bool:
    """Whether anything accepts a connection on the endpoint's port (the server is up)."""
    host, port = endpoint.split("//")[1].split(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return False
    return True


def take_s3_away_when(
    proc: subprocess.Popen, s3_server, ready: Callable[[], bool], seconds: float = 5.0
) -> float:
    """Once ``ready()`` holds (polled while ``proc`` runs), stop the S3 server for ``seconds``, check that its
    port refuses connections, and start it again. Returns the outage's length; 0 if the job ended first."""
    while proc.poll() is None and not ready():
        time.sleep(0.1)
    if proc.poll() is not None:
        return 0.0
    began = time.monotonic()
    s3_server.stop()
    assert not endpoint_answers(s3_server.endpoint), "the S3 endpoint still answers"
    time.sleep(seconds)
    s3_server.start()
    return time.monotonic() - began


def test_embed_survives_the_s3_endpoint_down_for_seconds(s3_server, s3_root, tmp_path):
    """Take the S3 endpoint away for ~5 s (plus its restart) once the first shard is checkpointed: decode
    retries, task retries and the S3 clients' own retries carry the job through, nothing lost."""
    model_id = audio_root(s3_root, n_tracks=4)
    expected = uninterrupted_embeddings(s3_root, model_id)
    dataset = embeddings_table.dataset_uri(Layout(s3_root).embeddings, model_id)
    checkpoints = count_files(storage.join(dataset, embedder.CHECKPOINTS), ".parquet", exclude=".pending.")
    cmd = job_command("embed", "--root", s3_root, "--actors", "1", *EMBED_ARGS, *iceberg_args(tmp_path))
    proc = start(cmd, tmp_path / "embed.log")
    try:
        outage = take_s3_away_when(proc, s3_server, lambda: checkpoints() >= 1)
        text = finish(proc, tmp_path / "embed.log")
    finally:
        kill(proc)
    assert outage, f"the job ended before the outage\n{tail(tmp_path / 'embed.log')}"
    assert not dead_threads(text), f"a background thread died: {dead_threads(text)}"
    assert proc.returncode == 0, f"failed after a {outage:.1f} s outage\n{text[-4000:]}"
    check_embeddings(s3_root, model_id, expected)


def test_tag_through_the_s3_endpoint_down_for_seconds(s3_server, s3_root, tmp_path):
    """Take the S3 endpoint away for ~5 s (plus its restart) while the tag job reads and scores: it either
    finishes or fails naming the storage error; nothing is half-published, and a re-run (if needed) gives
    every track's tags once."""
    cat, emb = synthetic_root(s3_root, n_files=6)
    probe_set = publish_probe_set(s3_root, cat, emb)
    catalog_uri = f"sqlite:///{tmp_path}/iceberg.db"  # the S3 endpoint goes away, not the catalog
    commit_previous_tags(s3_root, catalog_uri)
    cmd = job_command("tag", "--root", s3_root, "--run-id", "tags-outage", "--batch-size", "8")
    cmd += ["--catalog-uri", catalog_uri]
    log = tmp_path / "tag.log"
    proc = start(cmd, log)

    def scoring() -> bool:
        return any("counted_model_rows" in c for c in descendants(proc.pid).values())

    try:
        outage = take_s3_away_when(proc, s3_server, scoring)
        text = finish(proc, log)
    finally:
        kill(proc)
    assert outage, f"the job ended before the outage\n{tail(log)}"
    assert not dead_threads(text), f"a background thread died: {dead_threads(text)}"
    if proc.returncode != 0:  # failed: clearly, and with nothing committed; the same command completes
        assert "Error" in text.strip().splitlines()[-1], text[-4000:]
        table = tag_table.require_table(Where(s3_root, catalog_uri))
        assert [r.run_id for r in tag_table.runs(table)] == ["tags-previous"]
        run(cmd, tmp_path / "again.log")
    print(f"tag, S3 down {outage:.1f} s: first run exited {proc.returncode}")
    table = tag_table.require_table(Where(s3_root, catalog_uri))
    assert [r.run_id for r in tag_table.runs(table)] == ["tags-previous", "tags-outage"]
    assert tag_table.verify(table) == []
    check_tags(s3_root, cat, emb, probe_set, catalog_uri)


def test_tune_through_the_s3_endpoint_down_for_seconds(s3_server, s3_root, tmp_path):
    """Take the S3 endpoint away for ~5 s once the sweep has written a trial file: the job either finishes
    or fails naming the error with nothing published; either way its results (after the same command
    again, if it failed) equal the trials computed directly."""
    synthetic_root(s3_root)
    layout = Layout(s3_root)
    cmd = job_command("tune", "--root", s3_root, "--run-id", "tune-outage", *TUNE_ARGS)
    trials = count_files(
        storage.join(versions.version_uri(layout.probes, "tune-outage"), "trials"), ".parquet"
    )
    log = tmp_path / "tune.log"
    proc = start(cmd, log)
    try:
        outage = take_s3_away_when(proc, s3_server, lambda: trials() >= 1)
        text = finish(proc, log)
    finally:
        kill(proc)
    assert outage, f"the job ended before the outage\n{tail(log)}"
    assert not dead_threads(text), f"a background thread died: {dead_threads(text)}"
    if proc.returncode != 0:
        assert "Error" in text.strip().splitlines()[-1], text[-4000:]
        assert versions.read_manifest(layout.probes, "tune-outage") is None, "published after failing"
        run(cmd, tmp_path / "again.log")
    print(f"tune, S3 down {outage:.1f} s: first run exited {proc.returncode}")
    check_tune_results(s3_root, "tune-outage")


def test_pretrain_through_the_s3_endpoint_down_for_seconds(s3_server, s3_root, tmp_path):
    """Take the S3 endpoint away for ~8 s once pretraining has checkpointed to S3: the run finishes (the S3
    clients' retries, Ray Train restarting failed workers, and the job restarting a controller that could
    not write its state, each from the last registered checkpoint); the lease's heartbeat lives through
    it; the shards hold every train track once. Longer outages: docs/RELIABILITY.md."""
    root, cmd = pretrain_command(tmp_path, "--steps", "40", root=s3_root)
    layout = Layout(root)
    checkpoints = count_files(storage.join(layout.runs, "pretrain"), "/state.pt")
    log = tmp_path / "pretrain.log"
    proc = start(cmd, log)
    try:
        outage = take_s3_away_when(proc, s3_server, lambda: checkpoints() >= 1, seconds=8)
        text = finish(proc, log, timeout=400)
    finally:
        kill(proc)
    assert outage, f"the job ended before the outage\n{tail(log)}"
    assert not dead_threads(text), f"a background thread died: {dead_threads(text)}"
    assert proc.returncode == 0, f"failed after a {outage:.1f} s outage\n{text[-4000:]}"
    restarted = "controller failed on storage" in text
    print(f"pretrain, S3 down {outage:.1f} s: controller restarted by the job: {restarted}")
    card = storage.read_json(
        storage.join(layout.models, models.model_id_or_latest(layout.models), "card.json")
    )
    assert card["steps"] == 40
    check_shards(layout)


SLOWDOWN = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"


def read_chunked(rfile) -> bytes:
    """A request body sent with ``Transfer-Encoding: chunked`` (pyarrow's multipart uploads)."""
    data = b""
    while size := int(rfile.readline().split(b";")[0].strip(), 16):
        data += rfile.read(size)
        rfile.readline()
    while rfile.readline() not in (b"\r\n", b"\n", b""):
        pass
    return data


class ThrottlingProxy:
    """A loopback HTTP proxy in front of S3 that answers every ``every``-th request with 503 SlowDown, at
    most ``limit`` times, and forwards the rest unchanged (headers included, so signatures stay valid)."""

    def __init__(self, upstream: str, every: int = 4, limit: int = 40):
        host, port = upstream.split("//")[1].split(":")
        self.seen = self.throttled = 0
        lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def relay(self) -> None:
                chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
                length = int(self.headers.get("Content-Length") or 0)
                body = read_chunked(self.rfile) if chunked else self.rfile.read(length) if length else None
                with lock:
                    proxy.seen += 1
                    throttle = proxy.seen % every == 0 and proxy.throttled < limit
                    proxy.throttled += throttle
                if throttle:
                    self.send_response_only(503, "Slow Down")
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOWDOWN)))
                    self.end_headers()
                    self.wfile.write(SLOWDOWN if self.command != "HEAD" else b"")
                    return
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for key, value in self.headers.items():
                    conn.putheader(key, value)
                conn.endheaders(body, encode_chunked=chunked)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response_only(resp.status, resp.reason)
                for key, value in resp.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = relay

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> ThrottlingProxy:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_embed_throttled_by_s3_slowdown_finishes_with_nothing_lost(s3_server, s3_root, tmp_path):
    """Every 4th S3 request of the job (40 at most) gets 503 SlowDown: the S3 clients back off and retry."""
    model_id = audio_root(s3_root, n_tracks=4)
    expected = uninterrupted_embeddings(s3_root, model_id)
    with ThrottlingProxy(s3_server.endpoint) as proxy:
        cmd = job_command("embed", "--root", s3_root, "--actors", "1", *EMBED_ARGS, *iceberg_args(tmp_path))
        run(cmd, tmp_path / "embed.log", env=embed_env(proxy.endpoint))
    assert proxy.throttled >= 10, (proxy.seen, proxy.throttled)
    check_embeddings(s3_root, model_id, expected)


@pytest.fixture(scope="module")
def read_only_key(s3_server) -> Iterator[dict[str, str]]:
    """A second S3 identity that may read and list but not write: the server restarted knowing both."""
    identities = {
        "identities": [
            {"name": "tests", "credentials": [{"accessKey": "testing", "secretKey": "testing"}],
             "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
            {"name": "reader", "credentials": [{"accessKey": "reader", "secretKey": "reader-secret"}],
             "actions": ["Read", "List"]},
        ]
    }  # fmt: skip
    path = s3_server.folder / "identities-with-reader.json"
    path.write_text(json.dumps(identities))
    command = s3_server.command
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            s3_server,
            "command",
            lambda: [a if not a.startswith("-s3.config=") else f"-s3.config={path}" for a in command()],
        )
        s3_server.stop()
        s3_server.start()
        yield {"AWS_ACCESS_KEY_ID": "reader", "AWS_SECRET_ACCESS_KEY": "reader-secret"}


def test_embed_without_write_permission_fails_before_work_and_keeps_the_previous_version(
    s3_root, read_only_key, monkeypatch, tmp_path
):
    """A key that may read the bucket but not write it: embed fails at its first write (the lease), before
    any decoding, with the permission in its message; the committed version stays as it was."""
    model_id = audio_root(s3_root, n_tracks=2, faults=False)
    layout = Layout(s3_root)
    previous = uninterrupted_embeddings(s3_root, model_id)
    embeddings_table.publish_table(layout.embeddings, model_id, "v-previous", previous)
    dataset = embeddings_table.dataset_uri(layout.embeddings, model_id)
    before = versions.read_latest_manifest(dataset)
    env = {**embed_env(), **read_only_key}
    cmd = job_command(
        "embed", "--root", s3_root, "--only-new", "false", "--verbose", *EMBED_ARGS, *iceberg_args(tmp_path)
    )
    proc = start(cmd, tmp_path / "embed.log", env=env)
    text = finish(proc, tmp_path / "embed.log")
    last = text.strip().splitlines()[-1]
    assert proc.returncode == 1 and "permission denied writing" in last and dataset in last, text[-3000:]
    assert "decode_batch" not in text  # --verbose: Ray Data would have printed its plan
    assert versions.latest_version(dataset) == "v-previous"
    assert versions.read_latest_manifest(dataset) == before and versions.verify(before) == []
    assert versions.committed_versions(dataset) == ["v-previous"]
    assert not storage.exists(storage.join(dataset, embedder.PENDING))


def test_a_denied_write_names_what_was_denied(s3_root, read_only_key, monkeypatch):
    """The error an operator reads when a job's key may not write: it says which object, so which dataset."""
    for key, value in read_only_key.items():
        monkeypatch.setenv(key, value)
    uri = storage.join(s3_root, "embeddings", "some-model", versions.LEASE)
    with pytest.raises(storage.StorageError, match="some-model"):
        storage.create_only(uri, b"{}")


# --------------------------------------------------------------------------- a paused lease holder

HOLDER = """
import sys, time
import pyarrow as pa
from musiclib.core import storage, versions
dataset, go = sys.argv[1], sys.argv[2]
with versions.lease(dataset, ttl_s=3.0):
    uri = storage.join(versions.version_uri(dataset, "v-stale"), "part.parquet")
    rows = storage.write_parquet(pa.table({"run": ["stale"]}), uri)
    print("holding", flush=True)
    while not storage.exists(go):
        time.sleep(0.05)
    versions.publish(dataset, "v-stale", [uri], [rows])
    print("PUBLISHED v-stale", flush=True)
"""


def process_state(pid: int) -> str:
    """A process's state letter from /proc (``T``: stopped)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rfind(")") + 2]


def test_a_paused_lease_holder_resumed_after_a_takeover_does_not_publish(tmp_path):
    """A run stopped (SIGSTOP) past its lease's TTL loses the lease to the next run; continued (SIGCONT)
    while that run still writes, it fails with ``LeaseLost`` instead of publishing over the new run's work."""
    dataset = str(tmp_path / "ds")
    go = tmp_path / "go"
    log = tmp_path / "holder.log"
    holder = start([PY, "-c", HOLDER, dataset, str(go)], log)
    try:
        deadline = time.monotonic() + 60
        while "holding" not in tail(log) and holder.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "holding" in tail(log), tail(log)
        os.kill(holder.pid, signal.SIGSTOP)
        stopped_by = time.monotonic() + 5
        while process_state(holder.pid) != "T" and time.monotonic() < stopped_by:
            time.sleep(0.01)
        assert process_state(holder.pid) == "T", "the holder did not stop"
        with pytest.raises(versions.LeaseHeld):  # still within its TTL: the lease is its own
            with versions.lease(dataset):
                pass
        expires = storage.read_json(storage.join(dataset, versions.LEASE))["expires_at"]
        time.sleep(max(0.0, expires - time.time()) + 0.2)  # past the TTL, not renewed
        with versions.lease(dataset, ttl_s=60):  # taken over
            uri = storage.join(versions.version_uri(dataset, "v-new"), "part.parquet")
            rows = storage.write_parquet(pa.table({"run": ["new"]}), uri)
            go.touch()
            os.kill(holder.pid, signal.SIGCONT)
            holder.wait(timeout=60)
            versions.publish(dataset, "v-new", [uri], [rows])
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(holder.pid, signal.SIGCONT)
        kill(holder)
    text = tail(log)
    assert holder.returncode == 1 and "LeaseLost: lost the lease" in text and "PUBLISHED" not in text, text
    assert versions.committed_versions(dataset) == ["v-new"] and versions.latest_version(dataset) == "v-new"
    assert not storage.exists(storage.join(dataset, versions.LEASE))
