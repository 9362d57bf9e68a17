"""Dataclass configs with CLI overrides fail fast and clearly on wrong input."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from musiclib.core import config


@dataclass
class Demo:
    """A toy config."""

    root: str = "data/demo"
    steps: int = 10
    lr: float = 1e-4
    gpu: bool = False
    budgets: tuple[int, ...] = (1, 5)
    model_id: str | None = None

    def validate(self) -> None:
        if self.steps <= 0:
            raise config.ConfigError("steps must be positive")


def test_overrides_in_both_spellings():
    cfg = config.parse(
        Demo, ["--steps", "5", "lr=0.01", "--gpu=true", "--budgets", "1,2,20", "--model-id", "m1"]
    )
    assert (cfg.steps, cfg.lr, cfg.gpu, cfg.budgets, cfg.model_id) == (5, 0.01, True, (1, 2, 20), "m1")
    assert config.parse(Demo, []).model_id is None


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--stepz", "3"], "unknown option --stepz"),
        (["--steps", "many"], "cannot read 'many' as int"),
        (["--gpu", "maybe"], "cannot read 'maybe' as bool"),
        (["--steps", "0"], "steps must be positive"),
        (["--steps"], "needs a value"),
        (["stray"], "unexpected argument"),
    ],
)
def test_bad_values_fail_with_a_clear_message(argv, message):
    with pytest.raises(config.ConfigError, match=message):
        config.parse(Demo, argv)


def test_layout_places_each_dataset_under_the_root():
    layout = config.Layout("s3://bucket/lib")
    assert layout.catalog == "s3://bucket/lib/catalog/tracks.parquet"
    assert layout.embeddings == "s3://bucket/lib/embeddings" and layout.tags == "s3://bucket/lib/tags"


def test_location_fields_become_absolute_in_the_driver(tmp_path, monkeypatch):
    """Ray workers run elsewhere: a relative root must reach them as the absolute path it meant here."""
    monkeypatch.chdir(tmp_path)
    cfg = config.parse(Demo, ["--root", "data/demo"])
    assert cfg.root == str(tmp_path / "data" / "demo")
    assert config.parse(Demo, ["--root", "s3://bucket/lib/"]).root == "s3://bucket/lib"
    with pytest.raises(config.ConfigError, match="--root: unsupported URI scheme 'http'"):
        config.parse(Demo, ["--root", "http://example.com/x"])


def test_take_flags_moves_values_and_names_a_missing_one():
    args, flags = ["top", "drums", "--n", "3"], {"--root": "data/demo", "--n": "10"}
    config.take_flags(args, flags, "usage: x")
    assert args == ["top", "drums"] and flags == {"--root": "data/demo", "--n": "3"}
    with pytest.raises(SystemExit, match="--root needs a value; usage: x"):
        config.take_flags(["top", "--root"], {"--root": ""}, "usage: x")


def test_every_bad_option_is_reported_at_once():
    with pytest.raises(config.ConfigError) as error:
        config.parse(Demo, ["--stepz", "3", "--steps", "many", "stray", "--gpu"])
    message = str(error.value)
    assert message.startswith("4 problems with the options:")
    for part in ("unknown option --stepz", "cannot read 'many' as int", "unexpected argument", "--gpu needs"):
        assert part in message


@dataclass
class Settings:
    ray_address: str = ""  # where Ray runs


@dataclass
class Commented(Settings):
    """A toy config whose fields say what they are.

    In comments.
    """

    steps: int = 10  # training steps
    # labeled positives per tag,
    # all: every one
    budgets: list[str] = field(default_factory=lambda: ["1", "all"])
    seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]
    )  # seeds of the runs
    rate: float | None = None
    root: str = "data/demo"


def test_help_shows_each_option_with_its_type_default_and_help():
    assert config.field_help(Commented) == {
        "ray_address": "where Ray runs",
        "steps": "training steps",
        "budgets": "labeled positives per tag, all: every one",
        "seeds": "seeds of the runs",
    }
    text = config.help_text(Commented)
    assert "A toy config whose fields say what they are.\n\nIn comments.\n" in text
    assert "  --steps int, default 10\n      training steps\n" in text
    assert "  --budgets list[str], default 1,all\n      labeled positives per tag, all: every one\n" in text
    assert "  --rate float | None, default none\n  --root str, default 'data/demo'\n      where every" in text
    assert text.index("--root") < text.index("--ray-address")  # inherited options last


def test_a_yaml_file_sets_options_and_the_command_line_overrides_it(tmp_path):
    file = tmp_path / "demo.yaml"
    file.write_text("steps: 7\nlr: 0.5\nbudgets: [1, 2, 20]\ngpu: true\nmodel-id: null\n")
    cfg = config.parse(Demo, ["--config", str(file), "--lr", "0.01"])
    assert (cfg.steps, cfg.lr, cfg.budgets, cfg.gpu, cfg.model_id) == (7, 0.01, (1, 2, 20), True, None)
    file.write_text("stepz: 7\n")
    with pytest.raises(config.ConfigError, match="unknown option --stepz"):
        config.parse(Demo, ["--config", str(file)])
    file.write_text("- a list\n")
    with pytest.raises(config.ConfigError, match="a YAML mapping"):
        config.parse(Demo, ["--config", str(file)])
    with pytest.raises(config.ConfigError, match="--config .*missing.yaml"):
        config.parse(Demo, ["--config", str(tmp_path / "missing.yaml")])
