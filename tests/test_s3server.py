"""The SeaweedFS server the S3 tests run against: signed requests, multipart uploads, conditional writes,
and a stop and restart that keeps the data."""

from __future__ import annotations

import hashlib
import io
import os
import time

import pytest
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError, EndpointConnectionError

from cluster.s3server import SeaweedS3
from musiclib.core import storage

MIB = 1 << 20


def test_boto3_multipart_upload_is_signed_and_stored(s3_server, s3_root):
    """A 7 MiB object in 5 MiB parts (the S3 minimum part size) comes back byte for byte."""
    client = s3_server.client()
    bucket = s3_root.removeprefix("s3://")
    data = os.urandom(7 * MIB)
    transfer = TransferConfig(multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB)
    client.upload_fileobj(io.BytesIO(data), bucket, "big.bin", Config=transfer)
    head = client.head_object(Bucket=bucket, Key="big.bin")
    assert head["ContentLength"] == len(data)
    assert head["ETag"].strip('"').endswith("-2"), "not stored as a two-part upload"
    body = client.get_object(Bucket=bucket, Key="big.bin")["Body"].read()
    assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()


def test_s3fs_multipart_write_through_musiclib_storage(s3_root):
    """musiclib's s3fs, set up from the AWS variables, writes a multipart object and reads ranges of it."""
    uri = storage.join(s3_root, "dir", "big.bin")
    data = os.urandom(6 * MIB)
    fs, path = storage.filesystem(uri)
    with fs.open(path, "wb", block_size=5 * MIB) as f:
        f.write(data)
    assert storage.read_bytes(uri) == data
    with storage.open_input(uri) as f:
        f.seek(5 * MIB - 10)
        assert f.read(20) == data[5 * MIB - 10 : 5 * MIB + 10]


def test_wrong_secret_is_refused(s3_server):
    """The server checks signatures: the right key id with a wrong secret is refused."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        aws_access_key_id=s3_server.env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key="not-the-secret",
        region_name="us-east-1",
    )
    with pytest.raises(ClientError) as err:
        client.list_buckets()
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def _status(call) -> int:
    try:
        call()
    except ClientError as e:
        return e.response["ResponseMetadata"]["HTTPStatusCode"]
    return 200


def test_conditional_writes(s3_server, s3_root):
    """If-None-Match: * creates only a missing key; If-Match replaces only the ETag it names (412 otherwise)."""
    client = s3_server.client()
    bucket = s3_root.removeprefix("s3://")

    def put(body: bytes, **condition):
        return lambda: client.put_object(Bucket=bucket, Key="lease", Body=body, **condition)

    assert _status(put(b"one", IfNoneMatch="*")) == 200
    assert _status(put(b"two", IfNoneMatch="*")) == 412
    etag = client.head_object(Bucket=bucket, Key="lease")["ETag"]
    assert _status(put(b"two", IfMatch='"00000000000000000000000000000000"')) == 412
    assert _status(put(b"two", IfMatch=etag)) == 200
    assert _status(put(b"three", IfMatch=etag)) == 412
    assert client.get_object(Bucket=bucket, Key="lease")["Body"].read() == b"two"


@pytest.mark.slow
def test_stop_and_restart_keep_the_data(tmp_path):
    """After ``stop()`` the endpoint refuses connections; ``start()`` brings it back with the objects."""
    with SeaweedS3(tmp_path / "s3") as server:
        client = server.client(Config(retries={"max_attempts": 1}, connect_timeout=2))
        client.create_bucket(Bucket="kept")
        client.put_object(Bucket="kept", Key="a/b.txt", Body=b"still here")
        ports = server.ports
        server.stop()
        with pytest.raises(EndpointConnectionError):
            client.list_buckets()
        start = time.monotonic()
        server.start()
        print(f"restarted in {time.monotonic() - start:.1f} s")
        assert server.ports == ports
        assert client.get_object(Bucket="kept", Key="a/b.txt")["Body"].read() == b"still here"
    assert not any(path.exists() for path in ports.unix_sockets())
