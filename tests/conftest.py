"""Shared fixtures: a real S3 server (SeaweedFS on 127.0.0.1), a moto server, and small synthetic audio.

End-to-end tests use SeaweedFS (``s3_server``, ``s3_endpoint``, ``s3_root``): a real S3 implementation with
signed requests and multipart uploads. moto (``moto_endpoint``, ``moto_root``) is kept for tests that
inject errors into S3 responses, never for end-to-end tests.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from cluster.s3server import SeaweedS3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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

    port = _free_port()
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


@pytest.fixture
def sine():
    """A mono sine wave generator: ``sine(freq, seconds, sr)`` as float32."""

    def make(freq: float = 440.0, seconds: float = 3.0, sr: int = 44100, amp: float = 0.5) -> np.ndarray:
        t = np.arange(int(seconds * sr)) / sr
        return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)

    return make
