"""Shared fixtures and helpers: a real S3 server (SeaweedFS on 127.0.0.1), a PostgreSQL server for Iceberg
catalogs (``postgres_server``, ``postgres_catalog``), a moto server, one local Ray per
module, small synthetic audio, and the synthetic root and probe set the tune, tag and suggest tests read.

End-to-end tests use SeaweedFS (``s3_server``, ``s3_endpoint``, ``s3_root``): a real S3 implementation with
signed requests and multipart uploads. moto (``moto_endpoint``, ``moto_root``) is kept for tests that
inject errors into S3 responses, never for end-to-end tests. Test modules import the plain helpers with
``from conftest import ...`` (pytest puts ``tests/``, a folder without ``__init__.py``, on ``sys.path``).
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import pytest

from cluster.s3server import SeaweedS3

if TYPE_CHECKING:
    import pyarrow as pa

    from cluster.pgserver import PostgresServer
    from musiclib.probe import probes


SYNTHETIC_MODEL = "synthetic-m1"
LOGREG = {"budget": "all", "probe": "logreg", "norm": "standardize", "C": 1.0}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_synthetic_root(root: str, n_tracks: int = 240, **kwargs) -> tuple[pa.Table, pa.Table]:
    """A synthetic catalog, its embeddings of ``SYNTHETIC_MODEL`` (8 tags, 16 dimensions, the last 3 tracks
    with an embedding error) and the latest-model pointer under ``root``: what tune and tag read."""
    from musiclib.datasets import tagged_embeddings

    return tagged_embeddings.write_root(
        root, SYNTHETIC_MODEL, n_tracks=n_tracks, n_errors=3, n_tags=8, dim=16, **kwargs
    )


def publish_probe_set(
    root: str, cat: pa.Table, emb: pa.Table, run_id: str = "tune-test", config: dict | None = None
) -> probes.ProbeSet:
    """Fit a probe set (``LOGREG`` unless ``config``) on ``SYNTHETIC_MODEL``'s embeddings and publish it as
    the tune job does, without running a sweep."""
    from musiclib.core import storage, versions
    from musiclib.core.config import Layout
    from musiclib.probe import fewshot

    probe_set = fewshot.final_probe_set(fewshot.prepare(cat, emb, SYNTHETIC_MODEL), config or LOGREG)
    layout = Layout(root)
    uri = storage.join(versions.version_uri(layout.probes, run_id), "probe_set.safetensors")
    probe_set.save(uri)
    versions.publish(layout.probes, run_id, [uri], [len(probe_set.tags)])
    return probe_set


def _bucket_root(endpoint: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket at ``endpoint``, with the standard AWS variables set to ``env``; returns ``s3://bucket``."""
    import boto3

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name=env["AWS_REGION"]).create_bucket(Bucket=bucket)
    return f"s3://{bucket}"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[SeaweedS3]:
    """One SeaweedFS S3 server on 127.0.0.1 for the session (``stop()``/``start()`` take it away and back)."""
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    start = time.monotonic()
    with server:
        print(f"SeaweedFS S3 on {server.endpoint} started in {time.monotonic() - start:.1f} s")
        yield server


@pytest.fixture(scope="session")
def s3_endpoint(s3_server) -> str:
    """The SeaweedFS endpoint URL; its credentials are ``s3_server.env``."""
    return s3_server.endpoint


@pytest.fixture
def s3_root(s3_server, monkeypatch) -> str:
    """A fresh SeaweedFS bucket, with the standard AWS variables pointing at it; returns ``s3://bucket``."""
    return _bucket_root(s3_server.endpoint, s3_server.env, monkeypatch)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server on 127.0.0.1 for the session (Debian's ``postgresql``, ``make system-deps``),
    with a password-authenticated role and database: what a shared Iceberg SQL catalog lives in."""
    from cluster.pgserver import PostgresError, PostgresServer, bin_dir

    try:
        bin_dir()
    except PostgresError as exc:
        pytest.skip(str(exc))
    start = time.monotonic()
    with PostgresServer() as server:
        print(f"PostgreSQL on 127.0.0.1:{server.port} started in {time.monotonic() - start:.1f} s")
        yield server


@pytest.fixture
def postgres_catalog(postgres_server) -> str:
    """A fresh database on the PostgreSQL server for one test's Iceberg catalog; returns its URI."""
    return postgres_server.create_database(f"catalog_{uuid.uuid4().hex[:12]}")


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    """A storage root on local disk, then in a SeaweedFS bucket: a test that takes it runs on both."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_root") + "/store"


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1, only for tests that inject errors (not for end-to-end tests)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def moto_root(moto_endpoint, monkeypatch) -> str:
    """A fresh bucket on the moto server, with the standard AWS variables pointing at it."""
    env = {
        "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
    }
    return _bucket_root(moto_endpoint, env, monkeypatch)


@pytest.fixture(autouse=True)
def ray_only_in_slow_tests(request, monkeypatch) -> None:
    """A test that starts Ray must be marked ``slow`` (``make test-fast`` leaves those out): in any other
    test, starting Ray fails the test."""
    if request.node.get_closest_marker("slow") is not None:
        return
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError(f"{request.node.nodeid} starts Ray: mark it slow")

    assert "ray_local" not in request.fixturenames, f"{request.node.nodeid} uses ray_local: mark it slow"
    monkeypatch.setattr(ray, "init", refuse)


MLFLOW_USER = "tests"
MLFLOW_START_S = 600.0  # the first start imports Flask, FastAPI and SQLAlchemy: minutes on a loaded machine


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    """A real MLflow tracking server on 127.0.0.1 for the session, with basic auth; its URI. Its credentials
    are in the standard ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` for the session, set
    before any Ray starts (Ray Train's controller, which logs pretraining metrics, inherits them)."""
    import os
    import secrets
    import signal
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    pytest.importorskip("mlflow.server", reason="the MLflow server comes with the test extra: make setup")
    pytest.importorskip("flask_wtf", reason="MLflow's basic auth comes with the test extra: make setup")
    folder = tmp_path_factory.mktemp("mlflow")
    password = secrets.token_urlsafe(16)
    (folder / "auth.ini").write_text(
        f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{folder}/auth.db\n"
        f"admin_username = {MLFLOW_USER}\nadmin_password = {password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    port = free_port()
    env = os.environ | {
        "MLFLOW_AUTH_CONFIG_PATH": str(folder / "auth.ini"),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no background job runner: only tracking
    }
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--backend-store-uri", f"sqlite:///{folder}/mlflow.db", "--workers", "1"]
    command += ["--artifacts-destination", str(folder / "artifacts"), "--app-name", "basic-auth"]
    uri = f"http://127.0.0.1:{port}"
    log = folder / "server.log"
    with open(log, "ab") as out:
        server = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    start = time.monotonic()
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except (OSError, urllib.error.URLError):
                pass
            if server.poll() is not None or time.monotonic() - start > MLFLOW_START_S:
                raise RuntimeError(f"the MLflow server did not start on {uri}:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        print(f"MLflow server on {uri} started in {time.monotonic() - start:.1f} s")
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("MLFLOW_TRACKING_USERNAME", MLFLOW_USER)
            patch.setenv("MLFLOW_TRACKING_PASSWORD", password)
            yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the uvicorn worker it started
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.fixture(scope="module")
def ray_local(s3_server) -> Iterator[None]:
    """One local Ray (4 logical CPUs) for the module, its workers pointed at the SeaweedFS server through
    the standard AWS variables. Jobs called in the module join it (``ray_session``): Ray starts once."""
    import ray

    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": s3_server.env},
    )
    yield
    ray.shutdown()


@pytest.fixture
def sine():
    """A mono sine wave generator: ``sine(freq, seconds, sr)`` as float32."""

    def make(freq: float = 440.0, seconds: float = 3.0, sr: int = 44100, amp: float = 0.5) -> np.ndarray:
        t = np.arange(int(seconds * sr)) / sr
        return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)

    return make


@pytest.fixture
def commit_at_once(monkeypatch) -> Callable[[dict[str, Callable[[], None]]], list[str]]:
    """Runs writers in threads whose first Iceberg commits wait for each other: all plan on the same
    snapshot, one wins and the others must plan again. Returns the writers' commit attempts, in order."""
    from pyiceberg.table import Transaction

    def run(writers: dict[str, Callable[[], None]]) -> list[str]:
        all_planned = threading.Barrier(len(writers), timeout=60)
        calls: list[str] = []
        real = Transaction.commit_transaction

        def commit_together(self):
            name = threading.current_thread().name
            calls.append(name)
            if calls.count(name) == 1:
                all_planned.wait()
            return real(self)

        monkeypatch.setattr(Transaction, "commit_transaction", commit_together)
        threads = [threading.Thread(target=writer, name=name) for name, writer in writers.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        return calls

    return run
