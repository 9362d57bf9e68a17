"""The musiclib command: every job and query tool under one name, each option's help, bad input as one line,
and the wheel that installs it (the jobs inside as ``musiclib.jobs``)."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from musiclib import cli
from musiclib.core import config, progress, storage

PROJECT = Path(__file__).resolve().parents[1]
JOB_FILES = sorted(p for p in (PROJECT / "jobs").glob("*.py") if p.stem != "__init__")


def config_class(job: Path) -> type:
    """The config class a job's ``main`` parses, found in its source and imported from where the job has
    it (a library module: no Ray, no job module imported)."""
    tree = ast.parse(job.read_text())
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    call = next(n for n in ast.walk(main) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "parse")
    name = call.args[0].id
    module = next(
        n.module for n in tree.body if isinstance(n, ast.ImportFrom) and name in {a.name for a in n.names}
    )
    return getattr(importlib.import_module(module), name)


def test_every_job_is_a_command():
    assert {module for module, _ in cli.JOBS.values()} == {p.stem for p in JOB_FILES}


def test_help_lists_every_command_with_one_line(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, (_, text) in [*cli.JOBS.items(), *cli.TOOLS.items()]:
        assert f"  {name:<14}{text}\n" in out
    assert cli.main([]) == 2
    assert cli.main(["train"]) == 2 and "unknown command 'train'" in capsys.readouterr().err


@pytest.mark.parametrize("job", JOB_FILES, ids=lambda p: p.stem)
def test_every_option_of_every_job_has_its_help(job):
    cls = config_class(job)
    helps = {**config.SHARED_HELP, **config.field_help(cls)}
    assert [f.name for f in dataclasses.fields(cls) if not helps.get(f.name)] == []


def test_a_job_help_shows_type_default_and_help_of_every_option(capsys, monkeypatch):
    monkeypatch.setenv(progress.VERBOSE_ENV, "0")
    with pytest.raises(SystemExit) as exit:
        cli.main(["demo-catalog", "--help"])
    out = capsys.readouterr().out
    assert exit.value.code == 0 and out.startswith("usage: musiclib demo-catalog [--field value ...]")
    assert "  --n-tracks int, default 300\n      tracks generated\n" in out
    assert "  --faults bool, default false\n      add one track per decoder failure" in out
    assert "  --root str, default " in out and "s3://bucket/prefix" in out


def test_the_query_tool_help_exits_zero(capsys):
    assert cli.main(["tags", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: musiclib tags COMMAND") and "seed TAG" in out and "--catalog-uri" in out
    with pytest.raises(SystemExit) as exit:
        cli.main(["suggestions", "--help"])
    assert exit.value.code == 0 and capsys.readouterr().out.startswith("usage: musiclib suggestions")


def test_bad_options_are_one_message_and_a_traceback_only_when_verbose(capsys, monkeypatch):
    monkeypatch.setenv(progress.VERBOSE_ENV, "0")
    assert cli.main(["demo-catalog", "--n-tracks", "x", "--bogus", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("musiclib demo-catalog: 2 problems with the options:\n")
    assert "--n-tracks: cannot read 'x' as int" in err and "unknown option --bogus" in err
    assert "Traceback" not in err
    assert cli.main(["demo-catalog", "--n-tracks", "0", "--verbose"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("--n-tracks must be at least 1, got 0")


def test_a_storage_error_is_one_line(tmp_path, capsys):
    assert cli.main(["tags", "top", "bell", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("musiclib tags: no tag table") and len(err.strip().splitlines()) == 1


def test_known_errors_inside_ray_tasks_and_missing_extras():
    import ray.exceptions

    wrapped = ray.exceptions.RayTaskError(
        "f", "a long remote traceback", storage.StorageError("no such bucket")
    )
    assert cli.known_error(wrapped.as_instanceof_cause()) == "no such bucket"
    missing = ModuleNotFoundError("No module named 'mido'", name="mido")
    assert "pip install 'musiclib-tagger[corpus]'" in cli.known_error(missing)
    assert cli.known_error(RuntimeError("a bug")) is None  # a bug keeps its traceback
    assert cli.known_error(ModuleNotFoundError("No module named 'torch'", name="torch")) is None


def test_the_command_runs_the_jobs_of_this_checkout():
    """In a checkout the jobs are ``musiclib.jobs`` (an editable install maps them) or, where musiclib is
    not installed (make submit's working directory), ``jobs``: the checkout's files either way."""
    module = cli.job_module("make_demo_catalog")
    assert module.__name__ in ("musiclib.jobs.make_demo_catalog", "jobs.make_demo_catalog")
    assert Path(module.__file__).resolve() == PROJECT / "jobs" / "make_demo_catalog.py"


@pytest.mark.slow
def test_the_wheel_installs_the_command_and_every_job(tmp_path):
    """A wheel built from what the image copies (pyproject.toml, README.md, musiclib/, jobs/) holds every
    library module and every job under musiclib.jobs, no top-level jobs package, and the console script;
    unpacked away from the checkout, its command imports the jobs (the study imports three others) and
    prints their help."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(PROJECT / name, src / name)
    for name in ("musiclib", "jobs"):
        shutil.copytree(PROJECT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    build = [
        sys.executable,
        "-m",
        "uv",
        "build",
        "-q",
        "--wheel",
        "--out-dir",
        str(tmp_path / "dist"),
        str(src),
    ]
    subprocess.run(build, check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("musiclib_tagger-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    library = {str(p.relative_to(PROJECT)) for p in (PROJECT / "musiclib").rglob("*.py")}
    jobs = {f"musiclib/jobs/{p.name}" for p in (PROJECT / "jobs").glob("*.py")}
    assert library | jobs <= names and not any(n.startswith("jobs/") for n in names)
    assert "musiclib = musiclib.cli:main" in entry_points

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "from musiclib import cli; print(cli.job_module('study').__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert where.returncode == 0 and where.stdout.strip() == str(site / "musiclib" / "jobs" / "study.py"), (
        where
    )
    run = subprocess.run(
        [sys.executable, "-m", "musiclib.cli", "study", "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0 and run.stdout.startswith("usage: musiclib study"), run.stderr
