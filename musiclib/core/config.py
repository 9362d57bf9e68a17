"""Dataclass configs with command-line overrides: ``--field value`` or ``field=value``, checked before work starts."""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from typing import Any, TypeVar

T = TypeVar("T")

DEFAULT_ROOT = os.environ.get("MUSICLIB_ROOT", "data/demo")
URI_FIELDS = ("root", "catalog", "allowed_prefixes")  # config fields that name storage locations
ICEBERG_TABLE = "iceberg:"  # a track catalog that is an Iceberg table: iceberg:<namespace>.<table>[@<root>]


class ConfigError(ValueError):
    """A config field is unknown, of the wrong type, or out of range."""


def _convert(name: str, raw: str, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if raw.lower() in ("none", "null", ""):
            return None
        return _convert(name, raw, args[0])
    if origin in (list, tuple):
        items = [s for s in raw.split(",") if s != ""]
        vals = [_convert(name, s, args[0] if args else str) for s in items]
        return tuple(vals) if origin is tuple else vals
    try:
        if hint is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if hint in (int, float, str):
            return hint(raw)
    except ValueError as exc:
        raise ConfigError(f"--{name}: cannot read {raw!r} as {hint.__name__}") from exc
    raise ConfigError(f"--{name}: unsupported field type {hint}")


def parse(cls: type[T], argv: list[str] | None = None) -> T:
    """Build ``cls`` from its defaults and ``argv`` overrides, then run its ``validate()`` if it has one.

    ``--help`` prints the fields with their defaults and exits. ``--verbose``, which every job takes, is
    not a field: it lets Ray's INFO output through to the console (``progress.verbose``).
    """
    from musiclib.core import progress

    argv = sys.argv[1:] if argv is None else list(argv)
    if "--verbose" in argv:
        argv.remove("--verbose")
        progress.set_verbose(True)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if "--help" in argv or "-h" in argv:
        print(f"{cls.__name__}: {(cls.__doc__ or '').strip()}")
        for f in fields.values():
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            print(f"  --{f.name.replace('_', '-')} {hints[f.name]} (default {default!r})")
        print("  --verbose (a flag: Ray's INFO output on the console too; its log files always have it)")
        raise SystemExit(0)
    return build(cls, overrides(cls, argv))


def build(cls: type[T], values: dict[str, Any]) -> T:
    """``cls`` from ``values`` (the other fields their defaults), locations made absolute, then checked by
    its ``validate()`` if it has one: what ``parse`` does with the command line, for a caller with values."""
    cfg = absolute_uris(cls(**values))
    check = getattr(cfg, "validate", None)
    if callable(check):
        check()
    return cfg


def overrides(cls: type, argv: list[str]) -> dict[str, Any]:
    """The fields ``argv`` sets (``--field value`` or ``field=value``), read as their types; a ``ConfigError``
    for an unknown field or a value that does not read. Nothing is checked beyond that (``parse`` checks)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            key, eq, raw = arg[2:].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{arg} needs a value")
                raw = argv[i + 1]
                i += 1
        elif "=" in arg:
            key, _, raw = arg.partition("=")
        else:
            raise ConfigError(f"unexpected argument {arg!r}: use --field value or field=value")
        key = key.replace("-", "_")
        if key not in fields:
            raise ConfigError(
                f"unknown option --{key} for {cls.__name__}; known: {', '.join(sorted(fields))}"
            )
        values[key] = _convert(key, raw, hints[key])
        i += 1
    return values


def take_flags(args: list[str], flags: dict[str, Any], usage: str) -> None:
    """Move each ``--flag value`` named in ``flags`` from ``args`` into ``flags`` (the defaults stay otherwise);
    the small query tools' argument parsing (``musiclib.tag.tags``, ``musiclib.probe.report``, ``musiclib.study.study``)."""
    for flag in flags:
        if flag in args:
            i = args.index(flag)
            if i + 1 >= len(args):
                raise SystemExit(f"{flag} needs a value; {usage}")
            flags[flag] = args[i + 1]
            del args[i : i + 2]


def absolute_uris(cfg: T) -> T:
    """``cfg`` with its location fields (``URI_FIELDS``) as absolute URIs, resolved here in the driver.

    Ray workers run in another working directory, so a relative local path handed to them names
    another place (or nothing); an S3 URI is only put in canonical form.
    """
    from musiclib.core import storage

    def absolute(name: str, value: str) -> str:
        if name == "catalog" and value.startswith(ICEBERG_TABLE):
            return value  # a table name, not a storage location (musiclib.catalog reads it)
        try:
            return storage.normalize_uri(value)
        except storage.StorageError as exc:
            raise ConfigError(f"--{name.replace('_', '-')}: {exc}") from exc

    changes: dict[str, Any] = {}
    for name in URI_FIELDS:
        value = getattr(cfg, name, None)
        if isinstance(value, str) and value:
            changes[name] = absolute(name, value)
        elif isinstance(value, list | tuple):
            changes[name] = type(value)(absolute(name, v) for v in value)
    return dataclasses.replace(cfg, **changes) if changes else cfg


def as_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def check(job: str, problems: list[str]) -> None:
    """Raise one ``ConfigError`` listing every problem of a job's config, so all are fixed in one go."""
    if problems:
        raise ConfigError(f"invalid {job} config:\n  " + "\n  ".join(problems))


@dataclasses.dataclass
class RayConfig:
    """The Ray settings of every job, under the same names (job configs inherit them)."""

    ray_address: str = ""  # empty: RAY_ADDRESS inside a submitted job, else a new local Ray
    num_cpus: int = 0  # logical CPUs of a new local Ray (0: every core); ignored when joining a cluster

    def problems(self) -> list[str]:
        return (
            [f"--num-cpus must not be negative (0: every core), got {self.num_cpus}"]
            if self.num_cpus < 0
            else []
        )


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each job reads and writes under one root URI (local folder or ``s3://bucket/prefix``), and the
    track catalog it reads (``tracks``, a job's ``--catalog``; empty: the root's own)."""

    root: str
    tracks: str = ""

    def _at(self, *parts: str) -> str:
        from musiclib.core import storage

        return storage.join(self.root, *parts)

    @property
    def catalog(self) -> str:
        """The track catalog: ``tracks`` (an Iceberg table without ``@<root>`` is looked up in this root's
        Iceberg catalog, ``musiclib.catalog``), else ``<root>/catalog/tracks.parquet``."""
        if self.tracks.startswith(ICEBERG_TABLE) and "@" not in self.tracks:
            return f"{self.tracks}@{self.root}"
        return self.tracks or self._at("catalog", "tracks.parquet")

    @property
    def models(self) -> str:
        return self._at("models")

    @property
    def shards(self) -> str:
        return self._at("shards")

    @property
    def runs(self) -> str:
        return self._at("runs")

    @property
    def embeddings(self) -> str:
        return self._at("embeddings")

    @property
    def probes(self) -> str:
        return self._at("probes")

    @property
    def tags(self) -> str:
        return self._at("tags")

    @property
    def suggestions(self) -> str:
        return self._at("suggestions")

    @property
    def index(self) -> str:
        return self._at("index")

    @property
    def study(self) -> str:
        return self._at("study")
