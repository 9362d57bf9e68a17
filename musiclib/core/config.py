"""Dataclass configs with command-line overrides: ``--field value`` or ``field=value``, checked before work starts."""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys
import textwrap
import typing
from typing import Any, TypeVar

T = TypeVar("T")

DEFAULT_ROOT = os.environ.get("MUSICLIB_ROOT", "data/demo")
URI_FIELDS = ("root", "catalog", "allowed_prefixes")  # config fields that name storage locations
ICEBERG_TABLE = "iceberg:"  # a track catalog that is an Iceberg table: iceberg:<namespace>.<table>[@<root>]
SHARED_HELP = {  # the help of fields many configs have, where their source has no comment
    "root": "where every dataset lives: a local folder or s3://bucket/prefix (default: MUSICLIB_ROOT, else data/demo)",
}


class ConfigError(ValueError):
    """A config field is unknown, of the wrong type, or out of range."""


def _convert(name: str, raw: str, hint: Any) -> Any:
    flag = "--" + name.replace("_", "-")
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
        raise ConfigError(f"{flag}: cannot read {raw!r} as {hint.__name__}") from exc
    raise ConfigError(f"{flag}: unsupported field type {hint}")


def parse(cls: type[T], argv: list[str] | None = None) -> T:
    """Build ``cls`` from its defaults, a ``--config FILE.yaml`` and ``argv`` overrides, then run its
    ``validate()`` if it has one.

    ``--help`` prints every field with its type, default and help (``help_text``) and exits. ``--config``
    names a YAML mapping of fields to values (local or S3); options on the command line override it.
    ``--verbose``, which every job takes, is not a field: it lets Ray's INFO output through to the console
    (``progress.verbose``).
    """
    from musiclib.core import progress

    argv = sys.argv[1:] if argv is None else list(argv)
    if "--verbose" in argv:
        argv.remove("--verbose")
        progress.set_verbose(True)
    if "--help" in argv or "-h" in argv:
        print(help_text(cls))
        raise SystemExit(0)
    return build(cls, overrides(cls, config_file_args(cls, argv) + argv))


def config_file_args(cls: type, argv: list[str]) -> list[str]:
    """The options a ``--config FILE.yaml`` in ``argv`` sets, as ``--field value`` arguments (removed from
    ``argv``): lists become comma-separated, so a file and the command line read alike."""
    if "--config" not in argv or "config" in {f.name for f in dataclasses.fields(cls)}:
        return []
    import yaml

    from musiclib.core import storage

    i = argv.index("--config")
    if i + 1 >= len(argv):
        raise ConfigError("--config needs a value: a YAML file of field: value lines")
    uri = argv[i + 1]
    del argv[i : i + 2]
    try:
        values = yaml.safe_load(storage.read_bytes(storage.normalize_uri(uri)))
    except (storage.StorageError, yaml.YAMLError) as exc:
        raise ConfigError(f"--config {uri}: {exc}") from exc
    if not isinstance(values, dict):
        raise ConfigError(
            f"--config {uri}: a YAML mapping of field: value lines, got {type(values).__name__}"
        )
    args = []
    for key, value in values.items():
        if isinstance(value, list | tuple):
            value = ",".join(str(v) for v in value)
        args += [f"--{str(key).replace('_', '-')}", "none" if value is None else str(value)]
    return args


def type_name(hint: Any) -> str:
    """A field's type as a reader writes it: ``int``, ``list[str]``, ``float | None``."""
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def _as_option(value: Any) -> str:
    """A default as it is written on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "none"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value) or "''"
    if isinstance(value, str):
        return repr(value)
    return str(value)


def field_help(cls: type) -> dict[str, str]:
    """Each field's help, read from the source of ``cls`` and the dataclasses it inherits from: the comment
    after the field, or else the comment lines right above it."""
    import ast
    import io
    import tokenize

    helps: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # no source: a class made at run time
            continue
        comments: dict[int, tuple[str, bool]] = {}  # line: (text, alone on its line)
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                alone = not tok.line[: tok.start[1]].strip()
                comments[tok.start[0]] = (tok.string.lstrip("#").strip(), alone)
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
        for node in body:
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            lines = range(node.lineno, (node.end_lineno or node.lineno) + 1)
            text = [comments[n][0] for n in lines if n in comments and not comments[n][1]]
            above = node.lineno - 1
            while not text and above in comments and comments[above][1]:
                above -= 1
            if not text:
                text = [comments[n][0] for n in range(above + 1, node.lineno)]
            if text:
                helps[node.target.id] = " ".join(text)
    return helps


def help_text(cls: type) -> str:
    """What ``--help`` prints: the usage line, what the config is for, then every field as an option with
    its type, default and help."""
    hints = typing.get_type_hints(cls)
    helps = {**SHARED_HELP, **field_help(cls)}
    lines = [
        f"usage: {program()} [--field value ...] [--config FILE.yaml] [--verbose]",
        "",
        inspect.cleandoc(cls.__doc__ or cls.__name__),
        "",
        "options (also field=value; lists are comma-separated; none for an empty optional value):",
    ]
    own = vars(cls).get("__annotations__", {})
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name not in own):  # inherited ones last
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(
            f"  --{f.name.replace('_', '-')} {type_name(hints[f.name])}, default {_as_option(default)}"
        )
        lines += textwrap.wrap(helps.get(f.name, ""), 104, initial_indent=" " * 6, subsequent_indent=" " * 6)
    lines += [
        "  --config FILE.yaml",
        "      options from a YAML mapping (field: value, lists as YAML lists); the command line overrides it",
        "  --verbose",
        "      Ray's INFO output on the console too (its log files always have it), and tracebacks of errors",
    ]
    return "\n".join(lines)


def program() -> str:
    """How this program was started, for its usage line: ``musiclib tag``, ``python -m jobs.tag``."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if spec is not None and spec.name not in ("musiclib.cli", "__main__") and name.endswith(".py"):
        return f"python -m {spec.name}"
    return name or "python -m <job>"


def build(cls: type[T], values: dict[str, Any]) -> T:
    """``cls`` from ``values`` (the other fields their defaults), locations made absolute, then checked by
    its ``validate()`` if it has one: what ``parse`` does with the command line, for a caller with values."""
    cfg = absolute_uris(cls(**values))
    check = getattr(cfg, "validate", None)
    if callable(check):
        check()
    return cfg


def overrides(cls: type, argv: list[str]) -> dict[str, Any]:
    """The fields ``argv`` sets (``--field value`` or ``field=value``), read as their types; one
    ``ConfigError`` naming every unknown field and every value that does not read. Nothing is checked beyond
    that (``parse`` checks)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    problems: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg.startswith("--"):
            key, eq, raw = arg[2:].partition("=")
            if not eq:
                if i >= len(argv):
                    problems.append(f"{arg} needs a value")
                    continue
                raw = argv[i]
                i += 1
        elif "=" in arg:
            key, _, raw = arg.partition("=")
        else:
            problems.append(f"unexpected argument {arg!r}: use --field value or field=value")
            continue
        key = key.replace("-", "_")
        if key not in fields:
            known = ", ".join(f"--{f.replace('_', '-')}" for f in sorted(fields))
            problems.append(f"unknown option --{key.replace('_', '-')} for {cls.__name__}; known: {known}")
            continue
        try:
            values[key] = _convert(key, raw, hints[key])
        except ConfigError as exc:
            problems.append(str(exc))
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} problems with the options:\n  " + "\n  ".join(problems))
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
