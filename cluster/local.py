"""A real two-node Ray cluster on this machine, for tests and benchmarks: jobs go through ``make submit``.

The cluster is started with the ``ray`` CLI, not in-process: a head (``ray start --head``: 4 CPUs, its
own temp dir, free ports everywhere so other Ray instances on this machine are untouched) and a worker
joined with ``ray start --address`` (2 CPUs and a custom ``decode`` resource). Token authentication is
on: the nodes and the submitting shell share a token file through ``RAY_AUTH_TOKEN_PATH``. S3 is a
SeaweedFS server on 127.0.0.1 (``cluster/s3server.py``); the nodes hold the S3 credentials in their
environment, the submitting shell only the endpoint and region, which travel in the runtime env.

``start(s3_server)`` is a context manager: the cluster is stopped at the end whatever happens. Each node
runs ``ray start --block`` in its own process group, and the teardown ends those groups, then any process
left that names the temp dir. ``ray stop`` is never used, because it ends every Ray process on the machine.
Used by ``tests/test_cluster.py`` and ``bench/bench_load.py``.
"""

from __future__ import annotations

import contextlib
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
from dataclasses import dataclass, field
from pathlib import Path

from cluster.s3server import SeaweedS3

PROJECT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
RAY = VENV_BIN / "ray"
STAMP = PROJECT / ".venv" / ".installed"


class ClusterError(RuntimeError):
    """A node did not start, or the Ray job server cannot run here; the message ends with the node's log."""


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
    """Where the local cluster listens and the environments of its nodes and of the submitting shell."""

    temp_dir: str
    gcs_address: str
    dashboard_url: str
    node_env: dict[str, str]
    submit_env: dict[str, str]
    bucket: str
    node_pids: list[int] = field(default_factory=list)  # the `ray start --block` processes: Ray's roots

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
    raise ClusterError(f"local cluster: {what} did not start\n{log.read_text()[-3000:]}")


def _job_server_up(url: str, token_file: Path) -> bool:
    """The job server answers an authenticated request (the dashboard checks the token on every path)."""
    request = urllib.request.Request(
        f"{url}/api/version", headers={"Authorization": f"Bearer {token_file.read_text().strip()}"}
    )
    with urllib.request.urlopen(request, timeout=2) as resp:
        return resp.status == 200


def alive_nodes(env: dict[str, str], gcs_address: str) -> int:
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


@contextlib.contextmanager
def start(s3_server: SeaweedS3) -> Iterator[LocalCluster]:
    """Head (4 CPUs) plus worker (2 CPUs, ``decode: 2``) with token auth and S3 credentials; always stopped."""
    from ray._private.utils import get_dashboard_dependency_error

    if get_dashboard_dependency_error() is not None:
        raise ClusterError(f"the Ray job server needs ray[default]: {get_dashboard_dependency_error()}")
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
    # Each node its own temp dir: a node replaces a job's unpacked working directory (runtime_resources)
    # the first time it needs it, which under a shared one deleted the other node's processes' cwd.
    worker_args = [f"--address={gcs}", f"--temp-dir={temp_dir}/w", "--num-cpus=2", "--num-gpus=0"]
    worker_args += ['--resources={"decode": 2}']
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
            lambda: alive_nodes(node_env, gcs) == 2,
            nodes,
        )
        bucket = f"cluster-{uuid.uuid4().hex[:12]}"
        s3_server.client().create_bucket(Bucket=bucket)
        submit_env = {**base, "RAY_ADDRESS": url, "RUNTIME_ENV": "cluster/runtime_env.local.yaml"}
        yield LocalCluster(temp_dir, gcs, url, node_env, submit_env, bucket, [p.pid for p in nodes])
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


class aws_env:
    """Set this process's AWS variables for the S3 server inside a ``with`` block."""

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
