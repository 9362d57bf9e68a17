"""Submit a musiclib job to a Ray cluster's job server, and query, tail or stop it.

    python cluster/submit.py submit embed --root s3://bucket/catalog --decode-cpus 1
    python cluster/submit.py status|logs|stop <submission id>

``submit`` builds the job's runtime environment and runs ``ray job submit`` against ``RAY_ADDRESS``
(default ``http://127.0.0.1:8265``):

1. the runtime env file named by ``RUNTIME_ENV`` (``cluster/runtime_env.yaml``: pip pins for a real
   cluster; ``cluster/runtime_env.local.yaml``: nothing to install, for nodes that have the packages);
2. the project as working directory, without the virtualenv, data, git and caches;
3. the non-secret storage settings of this shell as ``env_vars`` (S3 endpoint, region, root, and the
   tag table's Iceberg catalog ``MUSICLIB_TAG_CATALOG``). Credentials never travel in the runtime env:
   nodes take them from their own environment (an IAM role on AWS, a Kubernetes Secret on KubeRay, the
   shell that ran ``ray start`` locally). A catalog URI with a password, in ``MUSICLIB_TAG_CATALOG`` or
   in ``--catalog-uri``, is refused: it would be stored with the job (PostgreSQL reads the password from
   ``PGPASSWORD`` or ``~/.pgpass`` on the head node instead).

Token authentication (on by default for Ray 2.59+ local clusters): the ``ray`` CLI sends the token only
when ``RAY_AUTH_MODE=token``. When this shell has a token (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or
Ray's default file ``~/.ray/auth_token``) and ``RAY_AUTH_MODE`` is unset, the ``ray`` CLI is run with
``RAY_AUTH_MODE=token`` so it reads the token from there itself; the token is never printed or written.

Each job validates its config and its storage before it starts Ray, so a bad option or an unreachable
root fails the job in seconds, with the reason as the last line of ``make logs``.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from musiclib.core import ray_env
from musiclib.core.iceberg import masked

PROJECT = Path(__file__).resolve().parent.parent
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
DEFAULT_RUNTIME_ENV = "cluster/runtime_env.yaml"

# Each job runs as ``python -m musiclib.cli <job> --root ROOT ARGS...`` in the working directory: the
# musiclib command, from the uploaded project (the nodes install only the pins, not the project).
JOBS = ("pretrain", "embed", "tune", "tag", "suggest", "index", "study")

# What the working directory upload leaves out (gitignore-style patterns).
EXCLUDES = [".venv/", "data/", "runs/", ".git/", "**/__pycache__/", ".pytest_cache/", ".ruff_cache/"]
EXCLUDES += ["*.egg-info/", "build/", "*.pyc"]

# Settings the jobs read from the environment that may travel with the job: none of them is a secret.
FORWARDED = (*ray_env.FORWARDED, "MUSICLIB_ROOT", "MUSICLIB_TAG_CATALOG")
SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN")

DEFAULT_TOKEN_FILE = Path.home() / ".ray" / "auth_token"


class SubmitError(RuntimeError):
    """The job name, the runtime env file or the command line is wrong."""


# --------------------------------------------------------------------------- runtime environment


def load_runtime_env(path: str) -> dict[str, Any]:
    """Read a runtime env YAML file; a ``pip`` field naming a requirements file becomes its list of pins."""
    file = PROJECT / path
    if not file.is_file():
        raise SubmitError(f"runtime env file not found: {path}")
    env = yaml.safe_load(file.read_text()) or {}
    if not isinstance(env, dict):
        raise SubmitError(f"{path}: a runtime env must be a mapping, got {type(env).__name__}")
    pip = env.get("pip")
    if isinstance(pip, dict) and isinstance(pip.get("packages"), str):
        env["pip"] = {**pip, "packages": read_requirements(PROJECT / pip["packages"])}
    return env


def read_requirements(path: Path) -> list[str]:
    """The requirement lines of a requirements file, without comments and blank lines."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def forwarded_settings(environ: dict[str, str]) -> dict[str, str]:
    """The non-secret storage settings of this shell that the job's processes should see."""
    return {name: environ[name] for name in FORWARDED if environ.get(name)}


def build_runtime_env(path: str, environ: dict[str, str]) -> dict[str, Any]:
    """The runtime env of a submission: the file's fields, the project as working dir, the settings."""
    env = load_runtime_env(path)
    env["working_dir"] = str(PROJECT)
    env["excludes"] = sorted(set(env.get("excludes", [])) | set(EXCLUDES))
    # The jobs' own ray.init(runtime_env=...) sets some of the same variables: let Ray merge the two.
    env["env_vars"] = {
        **env.get("env_vars", {}),
        **forwarded_settings(environ),
        "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1",
    }
    secret = set(env["env_vars"]) & set(SECRETS)
    if secret:
        raise SubmitError(f"{path}: remove the secrets {sorted(secret)}; nodes supply credentials")
    refuse_catalog_password(env["env_vars"].get("MUSICLIB_TAG_CATALOG", ""), "MUSICLIB_TAG_CATALOG")
    return env


def refuse_catalog_password(catalog_uri: str, where: str) -> None:
    """A catalog URI with a password must not travel with the job (runtime env and entrypoint are stored)."""
    if masked(catalog_uri) != catalog_uri:
        raise SubmitError(
            f"{where} carries a password ({masked(catalog_uri)}), which would be stored with the job: give the "
            f"head node the password instead (PGPASSWORD, ~/.pgpass, or on KubeRay the Secret "
            f"musiclib-iceberg-catalog)"
        )


def entrypoint(job: str, root: str, args: list[str]) -> str:
    """The shell command the job server runs in the working directory."""
    if job not in JOBS:
        raise SubmitError(f"unknown job {job!r}: choose one of {', '.join(JOBS)}")
    for flag, value in zip(args, args[1:]):
        if flag == "--catalog-uri":
            refuse_catalog_password(value, "--catalog-uri")
    return shlex.join(["python", "-m", "musiclib.cli", job, "--root", root, *args])


# --------------------------------------------------------------------------- the ray CLI


def cli_environment(environ: dict[str, str]) -> dict[str, str]:
    """This shell's environment, with token auth switched on for the ``ray`` CLI when a token is at hand."""
    env = dict(environ)
    has_token = (
        bool(env.get("RAY_AUTH_TOKEN") or env.get("RAY_AUTH_TOKEN_PATH")) or DEFAULT_TOKEN_FILE.is_file()
    )
    if has_token and "RAY_AUTH_MODE" not in env:
        env["RAY_AUTH_MODE"] = "token"
    return env


def ray_job(command: list[str], environ: dict[str, str]) -> int:
    """Run ``ray job <command>`` against ``RAY_ADDRESS``; return its exit status."""
    address = environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    ray = Path(sys.executable).with_name("ray")
    argv = [str(ray) if ray.exists() else "ray", "job", command[0], "--address", address, *command[1:]]
    print("+ " + shlex.join(argv), flush=True)
    return subprocess.call(argv, env=cli_environment(environ), cwd=PROJECT)


def submit(job: str, args: list[str], environ: dict[str, str]) -> int:
    """Submit a job and, unless ``--no-wait`` is in ``SUBMIT_FLAGS``, follow its logs until it ends."""
    root = environ.get("ROOT") or environ.get("MUSICLIB_ROOT") or "data/demo"
    runtime_env = build_runtime_env(environ.get("RUNTIME_ENV") or DEFAULT_RUNTIME_ENV, environ)
    flags = shlex.split(environ.get("SUBMIT_FLAGS", ""))
    if environ.get("JOB_ID"):
        flags += ["--submission-id", environ["JOB_ID"]]
    command = ["submit", "--runtime-env-json", json.dumps(runtime_env), *flags, "--"]
    return ray_job([*command, *shlex.split(entrypoint(job, root, args))], environ)


def main(argv: list[str]) -> int:
    """``submit JOB [ARGS...]`` or ``status|logs|stop JOB_ID``."""
    if len(argv) < 2 or argv[0] not in ("submit", "status", "logs", "stop"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    try:
        if argv[0] == "submit":
            return submit(argv[1], argv[2:], dict(os.environ))
        return ray_job(argv, dict(os.environ))
    except SubmitError as exc:
        print(f"submit: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
