"""Experiment tracking in MLflow (``--mlflow-uri`` of pretrain, tune and study): the URI's check, the runs.

Without a URI nothing here imports mlflow or logs anything. Credentials never enter a config: a password
in the URI is refused, since configs are recorded in manifests, checkpoints and model cards; MLflow's
client reads ``MLFLOW_TRACKING_USERNAME`` and ``MLFLOW_TRACKING_PASSWORD`` or ``MLFLOW_TRACKING_TOKEN``
from the environment of each process that logs (the driver, and for pretrain Ray Train's controller).
Every run goes to the experiment ``EXPERIMENT``; a run opened while another is open (a study's) nests in it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from musiclib.core import storage

SCHEMES = ("http", "https", "file", "sqlite", "databricks")  # databricks://<profile>, or "databricks" alone
EXPERIMENT = "musiclib"
TRUE = ("true", "1")  # how MLflow reads a boolean variable
PARAM_CHARS = 6000  # the longest parameter value an MLflow server stores


@dataclass(frozen=True)
class Tracked:
    """An open MLflow run: its server and id. Plain values, so a Ray Train callback can carry it."""

    uri: str
    run_id: str


def mask(uri: str) -> str:
    """``uri`` with the password of its user part, if any, as ``***``: what may be printed."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def problems(uri: str) -> list[str]:
    """What is wrong with ``--mlflow-uri`` (nothing when it is empty: no tracking), checked before Ray starts."""
    if not uri:
        return []
    parts = urllib.parse.urlsplit(uri)
    found = []
    if parts.scheme not in SCHEMES and uri != "databricks":  # the workspace of the default profile
        found.append(
            f"--mlflow-uri {mask(uri)!r}: use an http(s)://host, file:, sqlite: or databricks tracking URI"
        )
    elif parts.scheme in ("http", "https") and not parts.hostname:
        found.append(f"--mlflow-uri {mask(uri)!r}: no host")
    elif parts.scheme == "file" and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in TRUE:
        found.append(
            f"--mlflow-uri {mask(uri)!r}: MLflow 3 keeps runs in a database: use sqlite:///<path>.db (or set "
            "MLFLOW_ALLOW_FILE_STORE=true for its file store)"
        )
    if parts.password is not None:
        found.append(
            f"--mlflow-uri {mask(uri)!r}: no password in the URI (configs are recorded); set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN, instead"
        )
    if importlib.util.find_spec("mlflow") is None:
        found.append("--mlflow-uri needs the MLflow client: pip install 'musiclib[mlflow]'")
    return found


@contextmanager
def run(
    uri: str, name: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None
) -> Iterator[Tracked | None]:
    """An MLflow run named ``name`` for the block, with ``params`` logged as text and ``tags`` set; None
    without a URI. A run open in this process (the study's) is its parent; an exception ends it as FAILED."""
    if not uri:
        yield None
        return
    import mlflow

    mlflow.set_tracking_uri(uri)
    experiment = mlflow.set_experiment(EXPERIMENT)
    nested = mlflow.active_run() is not None
    with mlflow.start_run(
        run_name=name, experiment_id=experiment.experiment_id, nested=nested, tags=dict(tags or {})
    ) as active:
        mlflow.log_params({key: str(value)[:PARAM_CHARS] for key, value in params.items()})
        print(f"MLflow: run {name!r} ({active.info.run_id}) at {mask(uri)}, experiment {EXPERIMENT!r}")
        yield Tracked(uri, active.info.run_id)


def _client(tracked: Tracked) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracked.uri)


def log_metrics(tracked: Tracked | None, metrics: Mapping[str, Any], step: int = 0) -> None:
    """The finite numeric values of ``metrics`` at ``step`` (booleans and text left out), in one request."""
    if tracked is None:
        return
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    values = [
        Metric(key, float(value), now, step)
        for key, value in metrics.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ]
    _client(tracked).log_batch(tracked.run_id, metrics=values)


def log_dict(tracked: Tracked | None, value: Mapping[str, Any], name: str) -> None:
    """``value`` as the JSON artifact ``name`` (a model card)."""
    if tracked is None:
        return
    _client(tracked).log_text(tracked.run_id, json.dumps(value, indent=2, default=str), name)


def log_files(tracked: Tracked | None, uris: list[str]) -> None:
    """Copy the files at ``uris`` (local or S3, ``musiclib.core.storage``) into the run's artifacts."""
    if tracked is None:
        return
    with tempfile.TemporaryDirectory() as directory:
        for uri in uris:
            path = os.path.join(directory, uri.rstrip("/").rsplit("/", 1)[-1])
            with open(path, "wb") as f:
                f.write(storage.read_bytes(uri))
        _client(tracked).log_artifacts(tracked.run_id, directory)
