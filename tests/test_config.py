"""Dataclass configs with CLI overrides fail fast and clearly on wrong input."""

from __future__ import annotations

from dataclasses import dataclass

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
