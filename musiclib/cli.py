"""The ``musiclib`` command: every job and query tool under one name, and bad input as one line.

    musiclib pretrain|embed|tune|tag|suggest|index|study [--field value ...] [--config FILE.yaml] [--verbose]
    musiclib demo-catalog|bench-corpus [--field value ...]     the generated catalogs
    musiclib tags show|top|sql|history|outputs|similar|seed ...  the tag table and the embeddings
    musiclib suggestions show TAG                              the latest suggestions for a tag

Each job is its module's ``main`` (``jobs/<job>.py``), run as if it were the program: the same options,
the same ``--help``. A known error (a ``ConfigError``, a storage error, a decoder error, a missing optional
package) prints ``musiclib <command>: <message>`` on stderr and exits with status 2; ``--verbose`` (or
``MUSICLIB_VERBOSE=1``) prints its traceback too. The module above every stage: nothing imports it.
"""

from __future__ import annotations

import importlib
import sys
import traceback
from types import ModuleType

from musiclib import __version__
from musiclib.core import progress

# command: (module, what it does). A job's module is jobs.<name> in a checkout, musiclib.jobs.<name>
# installed (job_module); a query tool's module is a library module.
JOBS = {
    "demo-catalog": (
        "make_demo_catalog",
        "write the demo catalog: synthesised tracks with audible tags, few labels",
    ),
    "bench-corpus": (
        "make_bench_corpus",
        "write a labeled benchmark corpus (the corpus extra; docs/CORPUS.md)",
    ),
    "pretrain": ("pretrain", "pretrain the audio encoder (SemiSupCon, Ray Train) and export it"),
    "embed": ("embed", "embed every catalog track with the latest encoder (Ray Data)"),
    "tune": ("tune", "sweep few-shot probes over label budgets; write the report and probe set (Ray Tune)"),
    "tag": ("tag", "apply the chosen probes and commit the tags to the Iceberg tag table (Ray Data)"),
    "suggest": ("suggest", "pick, per tag, the tracks worth labeling next"),
    "index": ("index", "build the nearest-neighbour index of the latest embeddings"),
    "study": ("study", "compare encoders on a labeled corpus (docs/STUDY.md)"),
}
TOOLS = {
    "tags": (
        "musiclib.tag.tags",
        "query the tag table (show, top, sql, history, outputs), similar tracks, seed a tag",
    ),
    "suggestions": ("musiclib.tag.suggest", "show the latest suggestions for a tag"),
}

# (module, exception class): errors whose message says what to fix; looked up only in modules already
# imported, so the handler never loads torch or Ray itself.
KNOWN_ERRORS = (
    ("musiclib.core.config", "ConfigError"),
    ("musiclib.core.storage", "StorageError"),
    ("musiclib.core.storage", "TransientError"),
    ("musiclib.audio", "AudioError"),
    ("musiclib.tag.index", "NeighborsError"),
    ("musiclib.datasets.system_packages", "SystemPackageError"),
)
# Optional packages by the extra that brings them (pyproject.toml).
EXTRAS = {"soundfile": "demo", "music21": "corpus", "mido": "corpus", "torch_audiomentations": "bench"}
DISTRIBUTION = "musiclib-tagger"


def job_module(module: str) -> ModuleType:
    """A job's module: ``musiclib.jobs.<module>`` where musiclib is installed (the wheel maps ``jobs/``
    there), else ``jobs.<module>`` of the checkout this runs from (``python -m musiclib.cli`` in it)."""
    try:
        return importlib.import_module(f"musiclib.jobs.{module}")
    except ModuleNotFoundError as exc:
        if exc.name not in ("musiclib.jobs", f"musiclib.jobs.{module}"):
            raise
    return importlib.import_module(f"jobs.{module}")


def usage() -> str:
    lines = [
        f"usage: musiclib COMMAND [options]   (musiclib {__version__}; musiclib COMMAND --help for its options)",
        "",
        "jobs (every option is --field value; --config FILE.yaml; --verbose):",
    ]
    lines += [f"  {name:<14}{text}" for name, (_, text) in JOBS.items()]
    lines += ["", "query tools:"]
    lines += [f"  {name:<14}{text}" for name, (_, text) in TOOLS.items()]
    return "\n".join(lines)


def known_error(exc: BaseException) -> str | None:
    """The one line to print for an error the user can fix, or None for a bug (the traceback shows it)."""
    if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] in EXTRAS:
        extra = EXTRAS[exc.name.split(".")[0]]
        return f"{exc.name} is not installed: it comes with the {extra} extra, pip install '{DISTRIBUTION}[{extra}]'"
    cause = getattr(exc, "cause", None)  # a Ray task's error wraps the exception the task raised
    classes = tuple(
        getattr(sys.modules[module], name) for module, name in KNOWN_ERRORS if module in sys.modules
    )
    for candidate in (cause, exc):
        if isinstance(candidate, classes):
            return str(candidate)
    return None


def main(argv: list[str] | None = None) -> int:
    """Run ``musiclib COMMAND ...``; the exit status (0, or 2 for bad input or a known error)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    if args[0] == "--version":
        print(f"musiclib {__version__}")
        return 0
    command, rest = args[0], args[1:]
    if command not in JOBS and command not in TOOLS:
        print(f"musiclib: unknown command {command!r}; one of {', '.join([*JOBS, *TOOLS])}", file=sys.stderr)
        return 2
    verbose = "--verbose" in rest or progress.verbose()
    if command in TOOLS and "--verbose" in rest:  # the jobs' parser takes it; the query tools do not
        rest.remove("--verbose")
    program = sys.argv
    sys.argv = [f"musiclib {command}", *rest]  # what the job sees as its own command line (its --help)
    try:
        module = (
            job_module(JOBS[command][0]) if command in JOBS else importlib.import_module(TOOLS[command][0])
        )
        module.main(rest)
    except Exception as exc:
        message = known_error(exc)
        if message is None:
            raise
        if verbose:
            traceback.print_exc()
        print(f"musiclib {command}: {message}", file=sys.stderr)
        return 2
    finally:
        sys.argv = program
    return 0


if __name__ == "__main__":
    sys.exit(main())
