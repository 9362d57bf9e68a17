"""Debian packages the benchmark corpora need (FluidSynth, soundfonts, game soundtracks), installed by the project.

``require`` is idempotent: it asks ``dpkg-query`` which packages are installed and runs ``apt-get`` only
for the missing ones. When it cannot install (not root, no apt, a package apt does not know) it raises
``SystemPackageError`` naming the packages and the command to run.

    python -m musiclib.datasets.system_packages fluidsynth timgm6mb-soundfont   # what make system-deps runs
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


class SystemPackageError(RuntimeError):
    """A system package is missing and could not be installed; the message says what to run."""


def missing(packages: list[str]) -> list[str]:
    """The packages of ``packages`` that dpkg does not list as installed (all of them without dpkg)."""
    if shutil.which("dpkg-query") is None:
        return list(packages)
    return [
        p
        for p in packages
        if subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True
        ).stdout.strip()
        != "install ok installed"
    ]


def _no_lists() -> bool:
    """Whether apt has no package lists (a fresh machine or container: ``apt-get update`` never ran)."""
    return not any(Path("/var/lib/apt/lists").glob("*_Packages*"))


def _apt(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(["apt-get", "-q", *args], capture_output=True, text=True, env=env)


def require(packages: list[str], install: bool = True) -> list[str]:
    """Make sure every package is installed; return those this call installed.

    With ``install`` false, or when apt cannot be used, a missing package raises ``SystemPackageError``.
    """
    todo = missing(packages)
    if not todo:
        return []
    command = f"apt-get install -y --no-install-recommends {' '.join(todo)}"
    if not install:
        raise SystemPackageError(f"missing system package(s) {', '.join(todo)}: run `{command}` as root")
    if shutil.which("apt-get") is None:
        raise SystemPackageError(
            f"missing system package(s) {', '.join(todo)} and no apt-get here: install them by hand"
        )
    if os.geteuid() != 0:
        raise SystemPackageError(
            f"missing system package(s) {', '.join(todo)}; installing needs root: run `sudo {command}`"
        )
    if _no_lists():
        _apt("update")
    result = _apt("install", "-y", "--no-install-recommends", *todo)
    if result.returncode != 0:  # lists out of date (a 404, or a package they do not know yet): refresh once
        _apt("update")
        result = _apt("install", "-y", "--no-install-recommends", *todo)
    if result.returncode != 0:
        reason = next((ln for ln in result.stderr.splitlines() if ln.startswith("E:")), result.stderr.strip())
        raise SystemPackageError(
            f"cannot install system package(s) {', '.join(todo)} (`{command}` failed: {reason})"
        )
    return todo


def main(argv: list[str] | None = None) -> None:
    packages = sys.argv[1:] if argv is None else argv
    try:
        installed = require(packages)
    except SystemPackageError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"installed {' '.join(installed)}" if installed else f"present: {' '.join(packages)}")


if __name__ == "__main__":
    main()
