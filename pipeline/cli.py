"""Command-line flags generated from config dataclasses: one rule for train.py's `TrainConfig`, the backends' options
(`HostOptions`, `DaliOptions`, nested in it as `--host-*` / `--dali-*`) and `pipeline.bench`'s `BenchConfig`.

A field declared with `knob(default, help, ...)` becomes one flag: `--field-name` (or the `flag=` spelling), extra
spellings from `aliases`, `BooleanOptionalAction` for booleans, the field's type for the rest. A field whose default
is itself a config dataclass (`knob(factory=DaliOptions, ...)`) contributes its fields under its name as prefix. One
declared `shared=True` adds no flags: it takes the values of the top-level field of the same name (the hybrid
backend's `dali` and `host` parts are the run's `--dali-*` and `--host-*` options). A `list[...]` field is a
repeatable flag (None when not given). `assignments` reads `key=value,...` text by the same declarations.
`parse_with_config_file` adds timm's `-c/--config FILE.yaml` (keys: dest names; values: defaults; flags win).
Every command builds its parser as `CommandParser`: a usage error is two lines (a short usage, then the error), and
a float flag takes finite numbers only (`finite_float`), on the command line, in a YAML file and in `assignments`.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
from dataclasses import fields


class NotFinite(argparse.ArgumentTypeError):
    """A float flag given nan or an infinity (none of ours means "no limit" by inf: each says its own off value)."""


def finite_float(text: str) -> float:
    """A float flag's conversion: `float(text)`, refusing nan, inf and what overflows to inf (1e999), which would
    otherwise pass every `< 0` check and reach the run (an --lr inf diverges at step 2)."""
    value = float(text)  # not a number at all: ValueError, argparse's own "invalid float value: 'x'"
    if not math.isfinite(value):
        raise NotFinite(f"takes a finite number, got {text!r}")
    return value


finite_float.__name__ = "float"  # the word argparse puts in "invalid float value"

_TYPES = {"int": int, "float": finite_float, "str": str}
_TAKES = {"int": "an integer", "float": "a number", "bool": "1 or 0"}  # what a value of the type looks like
_BOOLS = {"1": True, "0": False}


class CommandParser(argparse.ArgumentParser):
    """The parser of every command whose flags come from here. A usage error is `usage: PROG [-h] REQUIRED
    [options] POSITIONALS` and `PROG: error: ...` (exit 2), not argparse's synopsis of every flag (50 lines for
    train.py) above the one line that matters; -h prints the full help as before. An unknown flag gets difflib's
    closest spelling."""

    def short_usage(self) -> str:
        formatter = self._get_formatter()
        words = [self.prog] + (["[-h]"] if self.add_help else [])
        for a in self._actions:  # what must be given: the required options, then the positionals after [options]
            if a.required and a.option_strings:
                words.append(f"{a.option_strings[0]} "
                             f"{formatter._format_args(a, formatter._get_default_metavar_for_optional(a))}")
        words.append("[options]")
        words += [formatter._format_args(a, formatter._get_default_metavar_for_positional(a))
                  for a in self._actions if not a.option_strings]
        return "usage: " + " ".join(words)

    def error(self, message: str):
        self.exit(2, f"{self.short_usage()}\n{self.prog}: error: {message}\n")

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            flags = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
            unknown = next((x.partition("=")[0] for x in extras if x.startswith("--")), "")
            close = difflib.get_close_matches(unknown, flags, n=1) if unknown else []
            hint = f" (did you mean {close[0]}?)" if close else ""
            self.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        return namespace


def knob(default=None, help: str = "", *aliases: str, choices=None, metavar=None, hidden: bool = False,
         flag: str | None = None, const=None, factory=None, shared: bool = False, required: bool = False,
         parse=None, default_help: str | None = None, nargs: int | None = None):
    """A config field plus what its flag needs. `const`: the flag may be given bare, meaning this value. `shared`
    (a nested config): no flags of its own, the top-level field of the same name's values. `parse`: the flag's
    conversion of its text where the declared type is not enough (it may raise argparse.ArgumentTypeError).
    `default_help`: what -h calls the default where the value would mislead (None standing for "not given").
    `nargs`: a `list[...]` field given as that many values after one flag (`--cutmix-minmax 0.2 0.8`) rather than
    as a repeatable flag."""
    meta = {"help": help, "aliases": aliases, "choices": choices, "metavar": metavar, "hidden": hidden, "flag": flag,
            "const": const, "shared": shared, "required": required, "parse": parse, "default_help": default_help,
            "nargs": nargs}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _nested(f: dataclasses.Field):
    """The config dataclass a field holds, or None for a plain value."""
    if f.default_factory is dataclasses.MISSING:
        return None
    value = f.default_factory()
    return type(value) if dataclasses.is_dataclass(value) else None


def _type_name(f: dataclasses.Field) -> str:
    """`int` for a field declared `int` or `int | None` (the modules declaring configs postpone annotations)."""
    return str(f.type).replace(" | None", "")


def flag_names(f: dataclasses.Field, prefix: str = "", underscores: bool = False) -> list[str]:
    primary = f.metadata.get("flag") or f"--{prefix}{f.name}".replace("_", "-")
    names = [primary, *f.metadata.get("aliases", ())]
    if underscores and f"--{prefix}{f.name}" not in names:
        names.append(f"--{prefix}{f.name}")
    return names


def add_flags(parser: argparse.ArgumentParser, cls, prefix: str = "", dest: str = "",
              underscores: bool = False) -> None:
    """One flag per field of `cls` (recursing into nested configs). `underscores`: `--batch_size` works beside
    `--batch-size`."""
    for f in fields(cls):
        sub = _nested(f)
        if sub is not None:
            if not f.metadata.get("shared"):
                add_flags(parser, sub, f"{prefix}{f.name}_", f"{dest}{f.name}.", underscores)
            continue
        meta = f.metadata
        # argparse treats help as a %-format string: a literal "%" in a help text would crash -h.
        text = meta.get("help", "").replace("%", "%%")
        if meta.get("required"):
            text += " (required)"
        elif meta.get("default_help"):
            text += f" (default: {meta['default_help'].replace('%', '%%')})"
        else:
            text += f" (default: {f.default})"
        kw = {"dest": dest + f.name, "default": f.default, "help": argparse.SUPPRESS if meta.get("hidden") else text}
        for key in ("choices", "metavar", "required"):
            if meta.get(key):
                kw[key] = meta[key]
        type_name = _type_name(f)
        if type_name == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif type_name.startswith("list[") and meta.get("nargs"):
            kw.update(nargs=meta["nargs"], type=_TYPES[type_name[len("list["):-1]])
        elif type_name.startswith("list["):
            kw.update(action="append", type=_TYPES[type_name[len("list["):-1]])
        else:
            kw["type"] = meta.get("parse") or _TYPES[type_name]
            if meta.get("const") is not None:
                kw.update(nargs="?", const=meta["const"])
        parser.add_argument(*flag_names(f, prefix, underscores), **kw)


def from_args(cls, values: dict, dest: str = ""):
    """An instance of `cls` from parsed flags (`vars(namespace)`), nested configs included."""
    kw = {}
    for f in fields(cls):
        sub = _nested(f)
        if sub is None:
            kw[f.name] = values[dest + f.name]
        else:
            kw[f.name] = from_args(sub, values, f"{'' if f.metadata.get('shared') else dest}{f.name}.")
    return cls(**kw)


def assignments(text: str, *classes) -> list[dict]:
    """`key=value,...` (e.g. the tail of bench_train's `--feed dali:readers=1,name=x`) as one dict per class: the
    keys given that name a plain field of that class (the first class that has it), each value converted by the
    field's declared type and checked against its choices; booleans are 1 or 0. Raises ValueError naming the item,
    or the key and what it takes."""
    known = [{f.name: f for f in fields(cls) if _type_name(f) in _TYPES or _type_name(f) == "bool"} for cls in classes]
    found = [{} for _ in classes]
    for item in filter(None, text.split(",")):
        key, eq, value = item.partition("=")
        owner = next((i for i, names in enumerate(known) if key in names), None)
        if owner is None or not eq:
            keys = dict.fromkeys(k for names in known for k in names)
            raise ValueError(f"{item!r} is not key=value with a key in {', '.join(keys)}")
        found[owner][key] = _convert(known[owner][key], value)
    return found


def _convert(f: dataclasses.Field, text: str):
    type_name, choices = _type_name(f), f.metadata.get("choices")
    try:
        value = _BOOLS[text] if type_name == "bool" else _TYPES[type_name](text)
    except (KeyError, ValueError):
        raise ValueError(f"{f.name} takes {_TAKES[type_name]}, got {text!r}") from None
    except NotFinite:
        raise ValueError(f"{f.name} takes a finite number, got {text!r}") from None
    if choices and value not in choices:
        raise ValueError(f"{f.name} takes one of {', '.join(map(str, choices))}, got {text!r}")
    return value


def plain(config) -> dict:
    """`dataclasses.asdict(config)` less the nested configs declared shared: their values stand once, at the top."""
    return {f.name: plain(value) if dataclasses.is_dataclass(value) else value
            for f in fields(config) if not f.metadata.get("shared") for value in [getattr(config, f.name)]}


def markdown_rows(cls, prefix: str = "") -> list[str]:
    """`| flags | default | meaning |` rows for a docs table, nested configs included, hidden fields left out."""
    rows = []
    for f in fields(cls):
        sub = _nested(f)
        if sub is not None:
            if not f.metadata.get("shared"):
                rows += markdown_rows(sub, f"{prefix}{f.name}_")
            continue
        if f.metadata.get("hidden"):
            continue
        names = ", ".join(f"`{x}`" for x in flag_names(f, prefix))
        choices = f" ({'/'.join(f.metadata['choices'])})" if f.metadata.get("choices") else ""
        rows.append(f"| {names} | `{f.default}` | {f.metadata['help']}{choices} |")
    return rows


class ConfigFileError(ValueError):
    """A -c/--config file that cannot be used; the message is one line naming the file."""


def config_action(parser: argparse.ArgumentParser) -> argparse.Action:
    """The parser's `--config` option, added as `-c/--config FILE` where it has none (so -h lists it). A config
    dataclass may declare it itself (`config: str = knob(None, "...", "-c")`): then the path lands in the config."""
    found = next((a for a in parser._actions if "--config" in a.option_strings), None)
    return found or parser.add_argument(
        "-c", "--config", metavar="FILE", help="YAML file of defaults, as timm's train.py -c: keys are the options' "
        "dest names (batch_size: 128, host_timeout_s: 60), values their defaults; flags given on the command line win")


def parse_with_config_file(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """`parser.parse_args(argv)` with the YAML file of `-c/--config FILE` (anywhere in argv) as the defaults, the
    command line winning; the namespace's `config` (the option's dest) is the file's path, or None. A file that
    cannot be used is a usage error (`parser.error`, exit 2) naming it; see `config_file_defaults`."""
    action = config_action(parser)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=parser.allow_abbrev, exit_on_error=False)
    pre.add_argument(*action.option_strings, dest="path")
    try:
        path = pre.parse_known_args(argv)[0].path
    except argparse.ArgumentError:  # e.g. a bare -c: the parser below says so in its own words
        path = None
    defaults = {}
    if path is not None:
        try:
            defaults = config_file_defaults(parser, path, skip=action)
        except ConfigFileError as e:
            parser.error(str(e))
    # argparse appends a repeated flag's values to its default: the command line's list is to replace the file's.
    lists = {a.dest for a in parser._actions if isinstance(a, argparse._AppendAction)} & defaults.keys()
    parser.set_defaults(**{dest: None if dest in lists else value for dest, value in defaults.items()})
    for a in parser._actions:
        a.required = a.required and a.dest not in defaults  # the file gave it
    namespace = parser.parse_args(argv)
    for dest in lists:
        if getattr(namespace, dest) is None:
            setattr(namespace, dest, defaults[dest])
    return namespace


def config_file_defaults(parser: argparse.ArgumentParser, path: str, skip: argparse.Action | None = None) -> dict:
    """{dest: default} from a YAML mapping whose keys name the parser's options: a dest (`host.timeout_s`) or a long
    flag with underscores for dashes (`host_timeout_s`, aliases such as `learning_rate`, `no_x` = x false). Values
    convert as the flag's text would (PyYAML reads 1e-3 as a string), lists for nargs/repeatable options, real
    booleans for switches, choices checked; null leaves the default. Raises ConfigFileError naming the file."""
    import yaml  # here: only a run given -c needs PyYAML

    where = f"--config {path}"
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, UnicodeError) as e:
        raise ConfigFileError(f"{where}: {getattr(e, 'strerror', None) or e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigFileError(f"{where}: not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if data is None:  # an empty file sets nothing
        data = {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"{where}: the top level must be a mapping of option names to values (batch_size: 128), "
                              f"got a {type(data).__name__}")
    options = _options_by_key(parser, skip)
    defaults, set_by = {}, {}
    for key, value in data.items():
        key = str(key)
        if key not in options:
            close = difflib.get_close_matches(key, [k for k in options if "-" not in k], n=1)
            raise ConfigFileError(f"{where}: unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        action, negated = options[key]
        if action.dest in set_by:
            raise ConfigFileError(f"{where}: {set_by[action.dest]} and {key} set the same option")
        set_by[action.dest] = key
        try:
            default = _yaml_value(action, value, negated)
        except ValueError as e:
            raise ConfigFileError(f"{where}: {key} {e}, got {value!r}") from None
        if default is not None:  # null, or a store_const switch set false: the option's own default
            defaults[action.dest] = default
    return defaults


def _options_by_key(parser: argparse.ArgumentParser, skip) -> dict:
    """YAML key -> (action, whether the key is a boolean's --no- spelling)."""
    options = {}
    for action in parser._actions:
        switch = isinstance(action, (argparse._StoreConstAction, argparse.BooleanOptionalAction))
        if action is skip or (action.nargs == 0 and not switch):
            continue  # -h, --version, counters: nothing a file sets
        options.setdefault(action.dest, (action, False))
        for flag in (f[2:] for f in action.option_strings if f.startswith("--")):
            negated = isinstance(action, argparse.BooleanOptionalAction) and flag.startswith("no-") \
                and f"--{flag[3:]}" in action.option_strings  # not a field that is itself named no_...
            options[flag] = options[flag.replace("-", "_")] = (action, negated)
    return options


_YAML_TAKES = {int: ("an integer", "integers"), finite_float: ("a number", "numbers"),
               str: ("a string", "strings")}


def _yaml_value(action: argparse.Action, value, negated: bool):
    """A YAML value as the action's default; ValueError saying what the option takes where it does not fit."""
    if value is None:
        return None
    if action.nargs == 0:  # a switch: YAML true/false only, not a word or number that might mean one
        if not isinstance(value, bool):
            raise ValueError("takes true or false")
        if isinstance(action, argparse.BooleanOptionalAction):
            return value != negated
        return action.const if value else None
    one, many = _YAML_TAKES.get(action.type, ("a value", "values"))
    if action.nargs in (None, "?") and not isinstance(action, argparse._AppendAction):
        _yaml_item(action, value, one)
        # A string default is converted by argparse itself, as the flag's text would be (once, not twice).
        return str(value) if action.type else value
    count = action.nargs if isinstance(action.nargs, int) else None
    if not isinstance(value, list) or len(value) != (count or len(value)) or (action.nargs == "+" and not value):
        size = f"{count} " if count else "one or more " if action.nargs == "+" else ""
        raise ValueError(f"takes a list of {size}{many}")
    return [_yaml_item(action, item, one) for item in value]


def _yaml_item(action: argparse.Action, value, one: str):
    if isinstance(value, bool):  # YAML 1.1 reads unquoted yes/no/on/off as booleans: no word, no number
        raise ValueError(f"takes {one}, not a boolean (quote the word)")
    if not isinstance(value, (str, int, float)):
        raise ValueError(f"takes {one}")
    try:
        item = action.type(str(value)) if action.type else value
    except NotFinite:  # YAML's .nan and .inf, or a string such as "inf"
        raise ValueError("takes a finite number") from None
    except argparse.ArgumentTypeError as e:  # the flag's own words (knob's `parse`)
        raise ValueError(str(e)) from None
    except (TypeError, ValueError):
        raise ValueError(f"takes {one}") from None
    if action.choices is not None and item not in action.choices:
        raise ValueError(f"takes one of {', '.join(map(str, action.choices))}")
    return item
