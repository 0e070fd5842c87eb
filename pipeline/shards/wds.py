"""Existing webdataset tars as a shard source: re-sharded with our index, manifest, restart markers and `--max-side`.

A tar's split is the first of train/val/validation among the words of its name (`imagenet-train-000012.tar`) or of its
folder (`train/000012.tar`); tars of no split (`test-*.tar`) are named in one line and not read. Members group into
samples by webdataset's rule (the key is the member name up to the first dot of its file name); a sample needs an image
(.jpg, .jpeg, .png, .webp) and an integer `.cls`. Other members (.json, .txt, ...) are not carried. Class names come
from a `classes.json` list in SRC, else are the label numbers. Tars are read in place by offset (`tarindex.py`), the
listings spread over the workers.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from pipeline.shards import tarindex
from pipeline.shards.errors import UsageError
from pipeline.shards.imagefolder import keyed_entries
from pipeline.shards.source import SPLIT_TOKENS, Scan, SplitScan, add_to_fingerprint, by_split

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
LABEL_EXT = "cls"
CLASS_NAMES = "classes.json"
MAX_LABEL = 1 << 20  # beyond this a .cls is not a class number


def tar_files(src: Path) -> list[str]:
    """The tars at the top of `src` and in its train/ val/ validation/ folders, relative to `src`, sorted."""
    found = []
    for folder in (src, *(src / s for s in SPLIT_TOKENS)):
        if folder.is_dir():
            found += [os.path.relpath(e.path, src) for e in os.scandir(folder) if e.is_file() and
                      e.name.endswith(".tar") and not e.name.startswith(".")]
    return sorted(found)


def sample_key(member: str) -> tuple[str, str]:
    """(key, extension) by webdataset's rule; the extension lower-cased."""
    folder, _, name = member.rpartition("/")
    stem, _, ext = name.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _label(head: bytes):
    text = head.decode("ascii", "replace").strip()
    return int(text) if re.fullmatch(r"\d+", text) and int(text) < MAX_LABEL else None


def scan_split(split: str, tars: list, listings: list) -> SplitScan:
    """A split's samples: (entries with their labels read, rejected samples); entries get keys later."""
    out, items = SplitScan(split), []
    for tar, listing in zip(tars, listings):
        cut = None
        if listing.problem:
            member, reason = listing.problem
            cut = sample_key(member)[0] if member else None  # that sample is rejected here, and once
            out.rejected.append({"split": split, "path": f"{tar}/{cut}" if member else tar, "reason": reason})
        groups = {}
        for name, offset, size in listing.members:
            key, ext = sample_key(name)
            if key != cut:
                groups.setdefault(key, {})[ext] = (offset, size)
        heads = {sample_key(name)[0]: head for name, head in listing.heads.items() if sample_key(name)[1] == LABEL_EXT}
        for key, parts in groups.items():
            path = f"{tar}/{key}"
            image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
            if Path(key).name.startswith("__"):  # webdataset's own records (__meta__ ...)
                out.ignored.append({"split": split, "path": path, "reason": "not a sample"})
            elif image is None:
                out.rejected.append({"split": split, "path": path, "reason": "no image member (.jpg, .jpeg, .png, "
                                                                              ".webp)"})
            elif LABEL_EXT not in parts:
                out.rejected.append({"split": split, "path": path, "reason": "no .cls member"})
            elif (label := _label(heads[key])) is None:
                out.rejected.append({"split": split, "path": path, "reason": ".cls is not a class number"})
            else:
                items.append((path, label, key, (tar, *image)))
    out.entries = items
    return out


def class_names(src: Path, labels: set) -> list:
    top = max(labels, default=-1)
    path = src / CLASS_NAMES
    if not path.is_file():
        return [str(i) for i in range(top + 1)]
    try:
        names = json.loads(path.read_text())
        assert isinstance(names, list) and all(isinstance(n, str) for n in names)
    except (OSError, ValueError, AssertionError):
        raise UsageError(f"{path}: not a JSON list of class names") from None
    if top >= len(names):
        raise UsageError(f"{path}: {len(names)} class names, but a .cls says {top}")
    return names


def scan(src: Path, workers: int = 1) -> Scan:
    per_split = by_split(tar_files(src), "tars", src)
    tars = sorted(t for split in per_split.values() for t in split)
    digest = hashlib.sha256(b"webdataset\n")
    for tar in tars:
        add_to_fingerprint(digest, tar, src / tar)
    jobs = [(src / t, 0, None, f".{LABEL_EXT}") for t in tars]
    listings = dict(zip(tars, tarindex.list_many(jobs, workers, "list tars")))
    splits = {s: scan_split(s, per_split[s], [listings[t] for t in per_split[s]])
              for s in ("train", "val") if s in per_split}
    classes = class_names(src, {e[1] for s in splits.values() for e in s.entries})
    digest.update("\n".join(classes).encode())
    for split in splits.values():
        split.entries = keyed_entries(split.entries, classes)
    return Scan(classes, splits, digest.hexdigest(), tarindex.TarReader(src))
