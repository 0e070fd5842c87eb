"""Command-line flags generated from config dataclasses: one rule for train.py's `TrainConfig`, the backends' options
(`HostOptions`, `DaliOptions`, nested in it as `--host-*` / `--dali-*`) and `pipeline.bench`'s `BenchConfig`.

A field declared with `knob(default, help, ...)` becomes one flag: `--field-name` (or the `flag=` spelling), extra
spellings from `aliases`, `BooleanOptionalAction` for booleans, the field's type for the rest. A field whose default
is itself a config dataclass (`knob(factory=DaliOptions, ...)`) contributes its fields under its name as prefix. One
declared `shared=True` adds no flags: it takes the values of the top-level field of the same name (the hybrid
backend's `dali` and `host` parts are the run's `--dali-*` and `--host-*` options). A `list[...]` field is a
repeatable flag (None when not given). `assignments` reads `key=value,...` text by the same declarations.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import fields

_TYPES = {"int": int, "float": float, "str": str}
_TAKES = {"int": "an integer", "float": "a number", "bool": "1 or 0"}  # what a value of the type looks like
_BOOLS = {"1": True, "0": False}


def knob(default=None, help: str = "", *aliases: str, choices=None, metavar=None, hidden: bool = False,
         flag: str | None = None, const=None, factory=None, shared: bool = False, required: bool = False,
         parse=None, default_help: str | None = None):
    """A config field plus what its flag needs. `const`: the flag may be given bare, meaning this value. `shared`
    (a nested config): no flags of its own, the top-level field of the same name's values. `parse`: the flag's
    conversion of its text where the declared type is not enough (it may raise argparse.ArgumentTypeError).
    `default_help`: what -h calls the default where the value would mislead (None standing for "not given")."""
    meta = {"help": help, "aliases": aliases, "choices": choices, "metavar": metavar, "hidden": hidden, "flag": flag,
            "const": const, "shared": shared, "required": required, "parse": parse, "default_help": default_help}
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
