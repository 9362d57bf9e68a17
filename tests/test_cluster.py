"""A real two-node Ray cluster on this machine: jobs go through ``make submit`` to the job server.

The cluster (``cluster/local.py``: a head with 4 CPUs and a worker with 2 CPUs and a ``decode`` resource,
started with the ``ray`` CLI, token authentication on) runs against the session's SeaweedFS server on
127.0.0.1 (``s3_server``); the nodes hold the S3 credentials in their environment, the submitting shell
only the endpoint and region, which travel in the runtime env. It is stopped at the end whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import time
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from cluster import local
from cluster.local import LocalCluster, aws_env, make
from tests.test_faults import descendants, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # a loaded 2-core machine is slow


@pytest.fixture(scope="module")
def cluster(s3_server) -> Iterator[LocalCluster]:
    """Head (4 CPUs) plus worker (2 CPUs, ``decode: 2``) with token auth and S3 credentials; always stopped."""
    with local.start(s3_server) as c:
        yield c


def job_status(cluster: LocalCluster, job_id: str) -> str:
    """The job's status word (SUCCEEDED, FAILED, ...) from ``make status``."""
    out = make("status", cluster.submit_env, timeout=60, JOB_ID=job_id)
    text = (out.stdout + out.stderr).lower()
    for word in ("succeeded", "failed", "stopped", "running", "pending"):
        if f"job '{job_id}' {word}".lower() in text or f"job '{job_id}': {word}".lower() in text:
            return word.upper()
    raise AssertionError(f"no job status in:\n{text}")


@pytest.fixture(scope="module")
def catalog_on_s3(cluster, s3_server) -> Iterator[str]:
    """A tiny demo catalog and a random narrow encoder under the cluster's S3 root; returns the model id."""
    from musiclib.datasets import demo
    from musiclib.train import models

    with aws_env(s3_server):
        demo.make_catalog(cluster.root, n_tracks=12, seed=0, min_seconds=3.0, max_seconds=5.0, workers=1)
        yield models.export_random_encoder(f"{cluster.root}/models", models.EncoderConfig(width=0.125))


# --------------------------------------------------------------------------- tests


def test_bad_root_fails_fast_through_the_job_server(cluster):
    """A root whose bucket does not exist fails in seconds, with a FAILED status and the reason in the logs."""
    job_id = f"bad-root-{uuid.uuid4().hex[:6]}"
    start = time.monotonic()
    out = make("submit", cluster.submit_env, JOB="embed", ROOT="s3://no-such-bucket-here/x", JOB_ID=job_id)
    elapsed = time.monotonic() - start
    assert out.returncode != 0
    assert job_status(cluster, job_id) == "FAILED"
    logs = make("logs", cluster.submit_env, timeout=60, JOB_ID=job_id).stdout
    assert "no-such-bucket-here" in logs and "musiclib embed: " in logs  # the command's one-line error
    assert "Traceback" not in logs
    assert elapsed < 120, f"a bad root took {elapsed:.0f} s to fail"


def test_job_server_refuses_a_wrong_token(cluster):
    """Authentication is really on: the same request with another token is refused."""
    env = {**cluster.submit_env, "RAY_AUTH_TOKEN": secrets.token_hex(32)}  # RAY_AUTH_TOKEN wins over the path
    out = make("status", env, timeout=60, JOB_ID="any")
    assert out.returncode != 0
    assert "Authentication failed" in out.stdout + out.stderr


def publish_centroid_probe_set(layout, model_id: str) -> list[str]:
    """Fit a centroid probe set on the published embeddings and publish it as a probe run (tune's output).

    The tune job sweeps probes on the same data; here two fixed tags are enough to exercise ``tag``.
    """
    from musiclib.core import storage, versions
    from musiclib.embed import table as embeddings_table
    from musiclib.probe import probes

    table = embeddings_table.read(layout.embeddings, model_id, columns=["embedding"])
    x = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    index = np.arange(len(x))
    y = np.stack([index % 2 == 0, index % 3 == 0], axis=1)
    probe_set = probes.fit("centroid", x, y, ["drums", "piano"], model_id=model_id)
    probe_set.thresholds = np.zeros(2, np.float32)
    run_id = "tune-cluster-test"
    uri = storage.join(versions.version_uri(layout.probes, run_id), "probe_set.safetensors")
    probe_set.save(uri)
    versions.publish(layout.probes, run_id, [uri], [len(probe_set.tags)])
    return probe_set.tags


def test_embed_then_tag_on_the_cluster(cluster, catalog_on_s3, s3_server, tmp_path):
    """embed, then tag with a probe set, run on the two-node cluster and leave complete outputs. The
    tag table's catalog is a SQLite file named explicitly: both nodes run on this machine."""
    from musiclib import catalog
    from musiclib.core import versions
    from musiclib.core.config import Layout
    from musiclib.embed import table as embeddings_table
    from musiclib.tag import tag_table

    model_id = catalog_on_s3
    layout = Layout(cluster.root)
    catalog_uri = f"sqlite:///{tmp_path}/iceberg.db"
    embed_args = f"--max-chunks 2 --batch-size 12 --decode-cpus 1 --actors 1 --catalog-uri {catalog_uri}"
    out = make("submit", cluster.submit_env, JOB="embed", ROOT=cluster.root, ARGS=embed_args)
    assert out.returncode == 0, out.stdout[-3000:]
    with aws_env(s3_server):
        tracks = sorted(catalog.read(layout.catalog, columns=["track_id"]).column("track_id").to_pylist())
        assert (
            sorted(embeddings_table.read(layout.embeddings, model_id).column("track_id").to_pylist())
            == tracks
        )
        manifest = versions.read_latest_manifest(embeddings_table.dataset_uri(layout.embeddings, model_id))
        assert not versions.verify(manifest)
        tag_names = publish_centroid_probe_set(layout, model_id)

    args = f"--batch-size 64 --catalog-uri {catalog_uri}"
    out = make("submit", cluster.submit_env, JOB="tag", ROOT=cluster.root, ARGS=args)
    assert out.returncode == 0, out.stdout[-3000:]
    with aws_env(s3_server):
        table = tag_table.require_table(tag_table.Where(cluster.root, catalog_uri))
        assert not tag_table.verify(table)
        rows = tag_table.read(table, columns=("track_id", "tag", "source")).to_pylist()
    model_rows = sorted((r["track_id"], r["tag"]) for r in rows if r["source"] == "model")
    assert model_rows == sorted((t, tag) for t in tracks for tag in tag_names)


def job_tasks(node_pid: int) -> list[str]:
    """Titles of the Ray workers below a node's ``ray start`` that run a task or an actor: not idle, and not
    the node's own agents."""
    own = ("ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent")
    return [c for c in descendants(node_pid).values() if c.startswith("ray::") and not c.startswith(own)]


def test_a_jobs_working_directory_survives_its_first_task_on_the_other_node(cluster, tmp_path, capfd):
    """Both nodes run on this machine. A node replaces a job's unpacked working directory the first time it
    needs it (Ray's runtime env agent removes and unpacks it again), so nodes sharing one temp dir deleted
    the driver's current directory under it: the tag job's driver then failed in ``os.getcwd()``. Each node
    has its own temp dir; a new working directory (never unpacked before) checks it."""
    from cluster.submit import ray_job

    work = tmp_path / "job"
    work.mkdir()
    (work / "check.py").write_text(
        f"# {uuid.uuid4().hex}: a package no node has unpacked yet\n"
        "import os\n"
        "import ray\n\n"
        "ray.init()\n"
        "before = os.getcwd()\n"
        "where = ray.remote(resources={'decode': 1}, num_cpus=0)(lambda: ray.get_runtime_context().get_node_id())\n"
        "assert ray.get(where.remote()) != ray.get_runtime_context().get_node_id(), 'not on the other node'\n"
        "print('driver cwd after the task:', os.getcwd() == before)\n"
    )
    status = ray_job(["submit", "--working-dir", str(work), "--", "python", "check.py"], cluster.submit_env)
    out = capfd.readouterr().out
    assert status == 0 and "driver cwd after the task: True" in out, out[-3000:]


def test_embed_survives_losing_the_worker_node(cluster, s3_server, tmp_path):
    """The worker node dies while it runs a task of the job (SIGKILL of every process it started): Ray runs
    the lost work again on the head, and the job publishes every track once. Last in the module: the
    cluster keeps one node after it."""
    from musiclib import catalog
    from musiclib.core import versions
    from musiclib.core.config import Layout
    from musiclib.datasets import demo
    from musiclib.embed import table as embeddings_table
    from musiclib.train import models

    root = f"s3://{cluster.bucket}/node-loss"
    layout = Layout(root)
    with aws_env(s3_server):
        demo.make_catalog(root, n_tracks=120, seed=1, min_seconds=3.0, max_seconds=5.0, workers=1)
        model_id = models.export_random_encoder(layout.models, models.EncoderConfig(width=0.125))
    dataset = embeddings_table.dataset_uri(layout.embeddings, model_id)
    job_id = f"node-loss-{uuid.uuid4().hex[:6]}"
    args = f"--max-chunks 2 --batch-size 2 --decode-cpus 1 --actors 1 --catalog-uri sqlite:///{tmp_path}/iceberg.db"
    out = make(
        "submit",
        cluster.submit_env,
        JOB="embed",
        ROOT=root,
        ARGS=args,
        JOB_ID=job_id,
        SUBMIT_FLAGS="--no-wait",
    )
    assert out.returncode == 0, out.stdout[-3000:]
    node = cluster.node_pids[-1]  # the worker node's `ray start`
    wait_for(lambda: job_tasks(node), 300, "a task of the job on the worker node", interval=0.2)
    for pid in [*descendants(node), node]:  # Ray workers run in process groups of their own
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert job_status(cluster, job_id) == "RUNNING", "the job ended before the node was lost"
    wait_for(lambda: local.alive_nodes(cluster.node_env, cluster.gcs_address) == 1, 120, "the node's death")
    wait_for(lambda: job_status(cluster, job_id) not in ("PENDING", "RUNNING"), 600, "the job", interval=5)
    logs = make("logs", cluster.submit_env, timeout=60, JOB_ID=job_id).stdout
    assert job_status(cluster, job_id) == "SUCCEEDED", logs[-3000:]
    with aws_env(s3_server):
        tracks = sorted(catalog.read(layout.catalog, columns=["track_id"]).column("track_id").to_pylist())
        assert (
            sorted(embeddings_table.read(layout.embeddings, model_id).column("track_id").to_pylist())
            == tracks
        )
        assert not versions.verify(versions.read_latest_manifest(dataset))
