"""A real two-node Ray cluster on this machine: jobs go through ``make submit`` to the job server.

The cluster is started with the ``ray`` CLI, not in-process: a head (``ray start --head``: 4 CPUs, its
own temp dir, free ports everywhere so other Ray instances on this machine are untouched) and a worker
joined with ``ray start --address`` (2 CPUs and a custom ``decode`` resource). Token authentication is
on: the nodes and the submitting shell share a token file through ``RAY_AUTH_TOKEN_PATH``. S3 is the
session's SeaweedFS server on 127.0.0.1 (``s3_server``); the nodes hold the S3 credentials in their
environment, the submitting shell only the endpoint and region, which travel in the runtime env.

The cluster is stopped at the end whatever happens: each node runs ``ray start --block`` in its own
process group, and the teardown ends those groups, then any process left that names the temp dir.
``ray stop`` is never used, because it ends every Ray process on the machine.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from s3server import SeaweedS3

PROJECT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
RAY = VENV_BIN / "ray"
STAMP = PROJECT / ".venv" / ".installed"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # a loaded 2-core machine is slow


WORKER_PORTS = 41  # each node's worker port range


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports that are free on 127.0.0.1 right now."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_range(avoid: set[int]) -> int:
    """First port of ``WORKER_PORTS`` consecutive free ports, none of them in ``avoid``.

    A range grown from one free port can cover a port already given to another service (Ray refuses to
    start then), so every port of the range is checked.
    """
    for _ in range(200):
        (start,) = _free_ports(1)
        ports = range(start, start + WORKER_PORTS)
        if ports[-1] < 65536 and not avoid.intersection(ports) and all(map(_bindable, ports)):
            return start
    raise RuntimeError("no free range of worker ports")


@dataclass
class LocalCluster:
    """Where the test cluster listens and the environments of its nodes and of the submitting shell."""

    temp_dir: str
    gcs_address: str
    dashboard_url: str
    node_env: dict[str, str]
    submit_env: dict[str, str]
    bucket: str

    @property
    def root(self) -> str:
        return f"s3://{self.bucket}/catalog"


# --------------------------------------------------------------------------- starting and stopping


def _base_env(token_file: Path, s3: dict[str, str]) -> dict[str, str]:
    """This shell's environment without Ray or AWS settings, plus the venv on PATH and the auth token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env.pop("MUSICLIB_ROOT", None)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.environ.get("PYTHONPATH", "")
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
    env.update(AWS_ENDPOINT_URL=s3["AWS_ENDPOINT_URL"], AWS_REGION=s3["AWS_REGION"])
    env.update(RAY_enable_worker_prestart="0", RAY_prestart_worker_first_driver="0")  # lighter start-up
    return env


def _node_args(ports: list[int]) -> list[str]:
    """Explicit ports for every service a node opens, so nothing collides with another Ray."""
    node_manager, object_manager, agent_http, agent_grpc, runtime_env_agent, metrics, workers = ports
    return [
        "--node-ip-address=127.0.0.1",
        f"--node-manager-port={node_manager}",
        f"--object-manager-port={object_manager}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env_agent}",
        f"--metrics-export-port={metrics}",
        f"--min-worker-port={workers}",
        f"--max-worker-port={workers + WORKER_PORTS - 1}",
        "--object-store-memory=200000000",
        "--disable-usage-stats",
        "--block",
    ]


def _start_node(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """``ray start ... --block`` in its own process group, its output to ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [str(RAY), "start", *args], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _launch(
    what: str, args: list[str], env: dict[str, str], log: Path, ready, nodes: list[subprocess.Popen]
) -> None:
    """Start a node and poll ``ready()``; retry once when it dies (Ray gives a raylet 30 s to register,
    which a loaded 2-core machine can miss); fail with its log after that."""
    for _ in range(2):
        node = _start_node(args, env, log)
        nodes.append(node)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and node.poll() is None:
            try:
                if ready():
                    return
            except Exception:
                pass
            time.sleep(1)
        _stop([node], "")
    pytest.fail(f"test cluster: {what} did not start\n{log.read_text()[-3000:]}")


def _job_server_up(url: str, token_file: Path) -> bool:
    """The job server answers an authenticated request (the dashboard checks the token on every path)."""
    request = urllib.request.Request(
        f"{url}/api/version", headers={"Authorization": f"Bearer {token_file.read_text().strip()}"}
    )
    with urllib.request.urlopen(request, timeout=2) as resp:
        return resp.status == 200


def _alive_nodes(env: dict[str, str], gcs_address: str) -> int:
    """Nodes the cluster reports alive, asked through ``ray status`` with the node environment."""
    out = subprocess.run(
        [str(RAY), "status", f"--address={gcs_address}"], env=env, capture_output=True, text=True, timeout=30
    ).stdout
    active = out.split("Active:", 1)[-1].split("Pending:", 1)[0]
    return sum(1 for line in active.splitlines() if "node_" in line)


def _stop(nodes: list[subprocess.Popen], temp_dir: str) -> None:
    """End each node's process group, then any process left whose command line names ``temp_dir``."""
    for p in nodes:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in nodes:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
    for proc in Path("/proc").iterdir() if temp_dir else []:
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if temp_dir.encode() in cmdline:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def cluster(s3_server) -> Iterator[LocalCluster]:
    """Head (4 CPUs) plus worker (2 CPUs, ``decode: 2``) with token auth and S3 credentials; always stopped."""
    from ray._private.utils import get_dashboard_dependency_error

    if get_dashboard_dependency_error() is not None:
        pytest.fail(f"the Ray job server needs ray[default]: {get_dashboard_dependency_error()}")
    temp_dir = tempfile.mkdtemp(prefix="mlray-", dir="/tmp")  # short: Ray's socket paths must stay < 108
    token_file = Path(temp_dir) / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    base = _base_env(token_file, s3_server.env)
    node_env = {**s3_server.env, **base}  # the nodes hold the credentials, the submitting shell does not
    gcs_port, dashboard, client, *ports = _free_ports(3 + 12)
    head_workers = _free_range(set(ports) | {gcs_port, dashboard, client})
    taken = set(ports) | {gcs_port, dashboard, client, *range(head_workers, head_workers + WORKER_PORTS)}
    node_workers = _free_range(taken)
    gcs = f"127.0.0.1:{gcs_port}"
    head_args = [
        "--head",
        f"--port={gcs_port}",
        f"--ray-client-server-port={client}",
        f"--temp-dir={temp_dir}",
    ]
    head_args += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}"]
    head_args += ["--num-cpus=4", "--num-gpus=0", *_node_args([*ports[:6], head_workers])]
    worker_args = [f"--address={gcs}", "--num-cpus=2", "--num-gpus=0", '--resources={"decode": 2}']
    worker_args += _node_args([*ports[6:], node_workers])
    url = f"http://127.0.0.1:{dashboard}"
    nodes: list[subprocess.Popen] = []
    try:
        _launch(
            "the head",
            head_args,
            node_env,
            Path(temp_dir) / "head.log",
            lambda: _job_server_up(url, token_file),
            nodes,
        )
        _launch(
            "the worker",
            worker_args,
            node_env,
            Path(temp_dir) / "worker.log",
            lambda: _alive_nodes(node_env, gcs) == 2,
            nodes,
        )
        bucket = f"cluster-{uuid.uuid4().hex[:12]}"
        s3_server.client().create_bucket(Bucket=bucket)
        submit_env = {**base, "RAY_ADDRESS": url, "RUNTIME_ENV": "cluster/runtime_env.local.yaml"}
        yield LocalCluster(temp_dir, gcs, url, node_env, submit_env, bucket)
    finally:
        _stop(nodes, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


# --------------------------------------------------------------------------- the submit path


def make(
    target: str, env: dict[str, str], timeout: float = 240, **variables: str
) -> subprocess.CompletedProcess:
    """Run ``make <target> VAR=value...`` in the project, as a user would; the venv stamp is not remade."""
    argv = ["make", "--no-print-directory", "-o", str(STAMP), target]
    argv += [f"{k}={v}" for k, v in variables.items()]
    result = subprocess.run(argv, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=timeout)
    print(f"$ {' '.join(argv)}\n{result.stdout}\n{result.stderr}")
    return result


def job_status(cluster: LocalCluster, job_id: str) -> str:
    """The job's status word (SUCCEEDED, FAILED, ...) from ``make status``."""
    out = make("status", cluster.submit_env, timeout=60, JOB_ID=job_id)
    text = (out.stdout + out.stderr).lower()
    for word in ("succeeded", "failed", "stopped", "running", "pending"):
        if f"job '{job_id}' {word}".lower() in text:
            return word.upper()
    raise AssertionError(f"no job status in:\n{text}")


@pytest.fixture(scope="module")
def catalog_on_s3(cluster, s3_server) -> Iterator[str]:
    """A tiny demo catalog and a random narrow encoder under the cluster's S3 root; returns the model id."""
    from musiclib import demo, models

    with _aws_env(s3_server):
        demo.make_catalog(cluster.root, n_tracks=12, seed=0, min_seconds=3.0, max_seconds=5.0, workers=1)
        encoder = models.SampleCNN(models.EncoderConfig(width=0.125))
        model_id = models.export_encoder(encoder, f"{cluster.root}/models", {"note": "random, for tests"})
        models.set_latest_model(f"{cluster.root}/models", model_id)
        yield model_id


class _aws_env:
    """Set the test process's AWS variables for the S3 server inside a ``with`` block."""

    def __init__(self, server: SeaweedS3):
        self.values = server.env

    def __enter__(self):
        self.saved = {k: os.environ.get(k) for k in self.values}
        os.environ.update(self.values)

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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
    assert "no-such-bucket-here" in logs and "Error" in logs
    assert elapsed < 120, f"a bad root took {elapsed:.0f} s to fail"


def test_job_server_refuses_a_wrong_token(cluster):
    """Authentication is really on: the same request with another token is refused."""
    env = {**cluster.submit_env, "RAY_AUTH_TOKEN": secrets.token_hex(32)}  # RAY_AUTH_TOKEN wins over the path
    out = make("status", env, timeout=60, JOB_ID="any")
    assert out.returncode != 0
    assert "Authentication failed" in out.stdout + out.stderr


def publish_probe_set(layout, model_id: str) -> list[str]:
    """Fit a centroid probe set on the published embeddings and publish it as a probe run (tune's output).

    The tune job sweeps probes on the same data; here two fixed tags are enough to exercise ``tag``.
    """
    from musiclib import embeddings, probes, storage

    table = embeddings.read(layout.embeddings, model_id, columns=["embedding"])
    x = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    index = np.arange(len(x))
    y = np.stack([index % 2 == 0, index % 3 == 0], axis=1)
    probe_set = probes.fit("centroid", x, y, ["drums", "piano"], model_id=model_id)
    probe_set.thresholds = np.zeros(2, np.float32)
    run_id = "tune-cluster-test"
    uri = storage.join(storage.version_uri(layout.probes, run_id), "probe_set.safetensors")
    probe_set.save(uri)
    storage.publish(layout.probes, run_id, [uri], [len(probe_set.tags)])
    return probe_set.tags


def test_embed_then_tag_on_the_cluster(cluster, catalog_on_s3, s3_server):
    """embed, then tag with a probe set, run on the two-node cluster and leave complete outputs."""
    from musiclib import catalog, embeddings, storage, tags
    from musiclib.config import Layout

    model_id = catalog_on_s3
    layout = Layout(cluster.root)
    embed_args = "--max-chunks 2 --batch-size 12 --decode-cpus 1 --actors 1"
    out = make("submit", cluster.submit_env, JOB="embed", ROOT=cluster.root, ARGS=embed_args)
    assert out.returncode == 0, out.stdout[-3000:]
    with _aws_env(s3_server):
        tracks = sorted(catalog.read(layout.catalog, columns=["track_id"]).column("track_id").to_pylist())
        assert sorted(embeddings.read(layout.embeddings, model_id).column("track_id").to_pylist()) == tracks
        manifest = storage.read_latest_manifest(embeddings.dataset_uri(layout.embeddings, model_id))
        assert not storage.verify(manifest)
        tag_names = publish_probe_set(layout, model_id)

    out = make("submit", cluster.submit_env, JOB="tag", ROOT=cluster.root, ARGS="--batch-size 64")
    assert out.returncode == 0, out.stdout[-3000:]
    with _aws_env(s3_server):
        manifest = storage.read_latest_manifest(layout.tags)
        assert not storage.verify(manifest)
        rows = tags.read_version(manifest, ["track_id", "tag", "source"]).to_pylist()
    model_rows = sorted((r["track_id"], r["tag"]) for r in rows if r["source"] == "model")
    assert model_rows == sorted((t, tag) for t in tracks for tag in tag_names)
