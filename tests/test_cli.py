"""pipeline/cli.py: flags generated from config dataclasses, nested options under their prefix."""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

import pytest

from pipeline.cli import add_flags, assignments, from_args, knob, markdown_rows


@dataclass(frozen=True)
class Inner:
    load: float = knob(0.5, "a share, e.g. 25% of the work")  # a % sign must not break -h
    fast: bool = knob(False, "a switch")


@dataclass
class Outer:
    data_path: str | None = knob(None, "a folder", "--data-path", flag="--data_path")
    size: int = knob(3, "a count", "-s")
    mode: str = knob("auto", "a mode", choices=("auto", "off"), const="auto")
    inner: Inner = knob(help="nested", factory=Inner)


def parse(argv, **kw):
    parser = argparse.ArgumentParser(prog="x")
    add_flags(parser, Outer, **kw)
    return parser, from_args(Outer, vars(parser.parse_args(argv)))


def test_flags_types_and_nesting():
    _, cfg = parse(["--data-path", "d", "-s", "5", "--inner-load", "1", "--inner-fast", "--mode"])
    assert cfg == Outer("d", 5, "auto", Inner(1.0, True))
    assert parse([])[1] == Outer()


def test_help_with_a_percent_sign_prints(capsys):
    parser, _ = parse([])
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["-h"])
    assert e.value.code == 0 and "25% of the work" in capsys.readouterr().out


def test_bad_values_are_usage_errors():
    for argv in (["--size", "x"], ["--mode", "on"], ["--inner-load"], ["--inner_load", "1"]):
        with pytest.raises(SystemExit):
            parse(argv)
    assert parse(["--inner_load", "1"], underscores=True)[1].inner.load == 1.0


def test_markdown_rows_cover_nested_fields():
    rows = markdown_rows(Outer)
    assert rows[0].startswith("| `--data_path`, `--data-path` | `None` |")
    assert any(r.startswith("| `--inner-fast` | `False` |") for r in rows) and len(rows) == 5


def nonempty(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text.upper()


@dataclass
class Command:
    src: str = knob(None, "a source", required=True, parse=nonempty)
    seed: int | None = knob(None, "a seed", default_help="the plan's, else 0")
    tags: list[str] | None = knob(None, "repeatable")


def test_required_parsed_repeatable_flags_and_default_help(capsys):
    parser = argparse.ArgumentParser(prog="x")
    add_flags(parser, Command)
    assert from_args(Command, vars(parser.parse_args(["--src", "a", "--tags", "t", "--tags", "u"]))) \
        == Command("A", None, ["t", "u"])
    assert from_args(Command, vars(parser.parse_args(["--src", "a"]))).tags is None
    for argv in ([], ["--src", ""]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
    assert "argument --src: must not be empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["-h"])
    text = " ".join(capsys.readouterr().out.split())
    assert "a source (required)" in text and "a seed (default: the plan's, else 0)" in text


@dataclass
class Opts:
    count: int = knob(1, "a count")
    share: float = knob(0.5, "a share")
    mode: str = knob("auto", "a mode", choices=("auto", "off"))
    fast: bool = knob(False, "a switch")
    name: str | None = None
    inner: Inner = knob(help="nested: not a key", factory=Inner)


@dataclass
class More:
    count: int = 0  # Opts has it first
    extra: int | None = None


def test_assignments_convert_by_declared_type():
    assert assignments("count=3,share=1,mode=off,fast=1,name=x=y", Opts) == [
        {"count": 3, "share": 1.0, "mode": "off", "fast": True, "name": "x=y"}]
    assert assignments("fast=0", Opts) == [{"fast": False}] and assignments("", Opts) == [{}]
    assert assignments("extra=2,count=5,", Opts, More) == [{"count": 5}, {"extra": 2}]
    bad = {"count=x": "count takes an integer, got 'x'", "share=": "share takes a number, got ''",
           "fast=true": "fast takes 1 or 0, got 'true'", "mode=on": "mode takes one of auto, off, got 'on'",
           "size=1": "'size=1' is not key=value with a key in count, share, mode, fast, name, extra",
           "count": "'count' is not key=value", "inner=1": "'inner=1' is not key=value"}
    for text, message in bad.items():
        with pytest.raises(ValueError, match="^" + re.escape(message)):
            assignments(text, Opts, More)
