"""pipeline/cli.py: flags generated from config dataclasses, nested options under their prefix."""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

import pytest

from pipeline.cli import add_flags, assignments, from_args, knob, markdown_rows, parse_with_config_file


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


def exclaim(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text + "!"  # not idempotent: a value converted twice would show


@dataclass
class Recipe:
    src: str = knob(None, "a source", required=True, parse=exclaim)
    lr: float = knob(0.1, "a rate", "--learning-rate")
    epochs: int = knob(3, "epochs")
    ema: bool = knob(True, "a switch")
    sched: str = knob("cos", "a schedule", choices=("cos", "step"))
    minmax: list[float] | None = knob(None, "repeatable")
    inner: Inner = knob(help="nested", factory=Inner)


def recipe_parser():
    parser = argparse.ArgumentParser(prog="x")
    add_flags(parser, Recipe)
    parser.add_argument("--crop", nargs=2, type=int, default=None)
    return parser


def from_file(tmp_path, text, *argv):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    ns = parse_with_config_file(recipe_parser(), [*argv, "-c", str(path)])
    return from_args(Recipe, vars(ns)), ns


def test_config_file_sets_defaults_and_the_command_line_wins(tmp_path):
    text = "src: a\nlr: 1e-3\nepochs: 5\nema: false\nsched: step\nminmax: [0.2, 0.8]\ninner_load: 1\ncrop: [3, 4]\n"
    cfg, ns = from_file(tmp_path, text)  # src: the file satisfies a required flag; 1e-3: a string to PyYAML
    assert cfg == Recipe("a!", 0.001, 5, False, "step", [0.2, 0.8], Inner(1.0, False)) and ns.crop == [3, 4]
    assert ns.config == str(tmp_path / "run.yaml")
    cfg, ns = from_file(tmp_path, text, "--epochs", "9", "--ema", "--minmax", "0.5", "--crop", "1", "2")
    assert (cfg.epochs, cfg.ema, cfg.minmax, ns.crop, cfg.lr) == (9, True, [0.5], [1, 2], 0.001)
    assert from_file(tmp_path, "src: a\nlr: null\n")[0].lr == 0.1  # null: the default
    assert from_file(tmp_path, "", "--src", "b")[0] == Recipe("b!")  # an empty file sets nothing


def test_config_file_keys_take_dests_aliases_and_no_spellings(tmp_path):
    cfg, _ = from_file(tmp_path, "src: a\nlearning_rate: 0.5\ninner.fast: true\nno_ema: true\ninner-load: 2\n")
    assert (cfg.lr, cfg.inner, cfg.ema) == (0.5, Inner(2.0, True), False)


@pytest.mark.parametrize("text, message", [
    ("epoch: 1", "unknown key 'epoch' (did you mean 'epochs'?)"),
    ("zzz: 1", "unknown key 'zzz'"),
    ("ema: maybe", "ema takes true or false, got 'maybe'"),
    ("ema: 1", "ema takes true or false, got 1"),
    ("epochs: 2.5", "epochs takes an integer, got 2.5"),
    ("src: off", "src takes a value, not a boolean (quote the word), got False"),  # YAML 1.1: off is a boolean
    ("lr: fast", "lr takes a number, got 'fast'"),
    ("sched: linear", "sched takes one of cos, step, got 'linear'"),
    ("crop: [1, 2, 3]", "crop takes a list of 2 integers, got [1, 2, 3]"),
    ("minmax: 0.5", "minmax takes a list of numbers, got 0.5"),
    ("src: ''", "src must not be empty, got ''"),
    ("lr: 1\nlearning_rate: 2", "lr and learning_rate set the same option"),
    ("lr: [1", "not valid YAML at line 1, column 7: expected ',' or ']', but got '<stream end>'"),
    ("- lr", "the top level must be a mapping of option names to values (batch_size: 128), got a list"),
])
def test_config_file_errors_are_one_line_naming_file_and_key(tmp_path, capsys, text, message):
    with pytest.raises(SystemExit) as e:
        from_file(tmp_path, text, "--src", "a")
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"x: error: --config {tmp_path / 'run.yaml'}: {message}"


def test_config_file_missing_or_not_given(tmp_path, capsys):
    for argv in (["--config", str(tmp_path / "none.yaml")], ["--src", "a", "-c"]):
        with pytest.raises(SystemExit):
            parse_with_config_file(recipe_parser(), argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("x: error:")]
    assert err == [f"x: error: --config {tmp_path / 'none.yaml'}: No such file or directory",
                   "x: error: argument -c/--config: expected one argument"]
    assert parse_with_config_file(recipe_parser(), ["--src", "a"]).config is None
    with pytest.raises(SystemExit):
        parse_with_config_file(recipe_parser(), ["-h"])
    assert "-c FILE, --config FILE" in capsys.readouterr().out


@dataclass
class Logged:
    config: str | None = knob(None, "the run's YAML file", "-c")
    size: int = knob(1, "a count")


def test_a_declared_config_field_is_the_option_and_records_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("size: 4\n")
    parser = argparse.ArgumentParser(prog="x")
    add_flags(parser, Logged)
    assert from_args(Logged, vars(parse_with_config_file(parser, [f"--config={tmp_path / 'a.yaml'}"]))) \
        == Logged(str(tmp_path / "a.yaml"), 4)


def test_config_file_with_train_py_flags(tmp_path, capsys):
    from trainlib.config import TrainConfig, build_parser

    path = tmp_path / "vit.yaml"
    path.write_text("backend: synthetic\nbatch_size: 128\nlearning_rate: 1e-3\nmodel_ema: true\n"
                    "aa: rand-m9-mstd0.5-inc1\ncutmix_minmax: [0.2, 0.8]\nhost_timeout_s: 60\nno_pixel_input: true\n"
                    "amp: bf16\n")
    cfg = from_args(TrainConfig, vars(parse_with_config_file(build_parser(), ["-c", str(path), "-b", "64"])))
    assert (cfg.batch_size, cfg.lr, cfg.model_ema, cfg.aa, cfg.cutmix_minmax, cfg.host.timeout_s, cfg.pixel_input,
            cfg.amp, cfg.backend) == (64, 0.001, True, "rand-m9-mstd0.5-inc1", [0.2, 0.8], 60.0, False, "bf16",
                                      "synthetic")
    assert from_args(TrainConfig, vars(parse_with_config_file(build_parser(), ["-c", str(path), "--no-amp"]))).amp \
        == "fp32"
    path.write_text("batchsize: 128\n")
    with pytest.raises(SystemExit):
        parse_with_config_file(build_parser(), ["-c", str(path)])
    assert capsys.readouterr().err.endswith(f"--config {path}: unknown key 'batchsize' (did you mean 'batch_size'?)\n")


def test_float_flags_take_finite_numbers_only(tmp_path, capsys):
    # nan passes every `< 0` check and inf every `> 0` one: refused where the text is read, whichever way it came.
    for text in ("nan", "inf", "-inf", "1e999"):
        with pytest.raises(SystemExit) as e:
            parse([f"--inner-load={text}"])
        assert e.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1] == \
            f"x: error: argument --inner-load: takes a finite number, got {text!r}"
        with pytest.raises(ValueError, match=f"^share takes a finite number, got {re.escape(repr(text))}$"):
            assignments(f"share={text}", Opts)
    for text, shown in ((".nan", "nan"), ("-.inf", "-inf"), ("'inf'", "'inf'"), ("[0.2, .inf]", "[0.2, inf]")):
        with pytest.raises(SystemExit):
            from_file(tmp_path, f"{'minmax' if '[' in text else 'lr'}: {text}", "--src", "a")
        key = "minmax" if "[" in text else "lr"
        assert capsys.readouterr().err.splitlines()[-1] == \
            f"x: error: --config {tmp_path / 'run.yaml'}: {key} takes a finite number, got {shown}"
    assert parse(["--inner-load=-1e-3"])[1].inner.load == -0.001  # finite values keep their range checks elsewhere


def test_every_command_built_here_answers_a_usage_error_in_two_lines(tmp_path):
    """argparse's own errors (unknown flag, bad type, missing value, a required flag), a -c file's unknown key and a
    command's own validation: a short usage line and the error, exit 2, not a synopsis of every flag."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    (tmp_path / "r.yaml").write_text("batchsize: 8\n")
    cases = [
        (["train.py", "--lr", "x"], "usage: train.py [-h] [options]",
         "train.py: error: argument --lr/--learning-rate: invalid float value: 'x'"),
        (["train.py", "--batchsize", "8"], "usage: train.py [-h] [options]",
         "train.py: error: unrecognized arguments: --batchsize 8 (did you mean --batch-size?)"),
        (["train.py", "-c", str(tmp_path / "r.yaml")], "usage: train.py [-h] [options]",
         f"train.py: error: --config {tmp_path / 'r.yaml'}: unknown key 'batchsize' (did you mean 'batch_size'?)"),
        (["train.py", "--backend", "host"], "usage: train.py [-h] [options]",
         "train.py: error: --backend host reads shards: give --data_path (or use a backend that reads none: "
         "synthetic)"),
        (["-m", "pipeline.bench", "--workers"], "usage: python -m pipeline.bench [-h] [options]",
         "python -m pipeline.bench: error: argument --workers/-j: expected one argument"),
        ([str(root / "tools" / "bench_train.py"), "--loops", "a", "--steps", "0"],
         "usage: bench_train.py [-h] [options]", "bench_train.py: error: --steps must be >= 1 and --warmup >= 0"),
        ([str(root / "tools" / "profile_step.py"), "--top", "1.5"], "usage: profile_step.py [-h] [options]",
         "profile_step.py: error: argument --top: invalid int value: '1.5'"),
        ([str(root / "tools" / "make_shards.py"), "--out", "x"],
         "usage: make_shards.py [-h] --data_path DATA_PATH --out OUT [options]",
         "make_shards.py: error: the following arguments are required: --data_path"),
    ]
    run = [(case, subprocess.Popen([sys.executable, *case[0]], cwd=root, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)) for case in cases]
    helped = subprocess.run([sys.executable, "train.py", "-h"], cwd=root, capture_output=True, text=True, timeout=120)
    for (argv, usage, error), proc in run:
        out, err = proc.communicate(timeout=120)
        assert (proc.returncode, out, err.splitlines()) == (2, "", [usage, error]), argv
    assert helped.returncode == 0 and "--nproc-per-node NPROC_PER_NODE" in helped.stdout  # -h: every flag, as before
    assert len(helped.stdout.splitlines()) > 100
