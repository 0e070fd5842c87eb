"""pipeline/cli.py: flags generated from config dataclasses, nested options under their prefix."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from pipeline.cli import add_flags, from_args, knob, markdown_rows


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
