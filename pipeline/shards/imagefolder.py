"""An ImageFolder as a shard source: which files exist, their labels and sample keys. Pure functions of the folder's
listing, so a rerun plans the same shards. The key rules are shared with the other sources, so the same images give
the same keys from every source."""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from pipeline.shards.errors import UsageError
from pipeline.shards.format import SPLITS
from pipeline.shards.source import Entry, FileReader, Scan, SplitScan, add_to_fingerprint

IGNORED_NAMES = {"thumbs.db", "desktop.ini", "ehthumbs.db"}
MAX_KEY = 80  # keeps `<key>.jpg` within ustar's 100-byte name field


def is_ignored(name: str) -> bool:
    """Hidden files (.DS_Store, ._* AppleDouble) and Windows thumbnails are not data."""
    return name.startswith(".") or name.lower() in IGNORED_NAMES


def class_dirs(split_dir: Path) -> list:
    """Visible sub-folders in sorted order: the torchvision ImageFolder label order."""
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not is_ignored(e.name))


def sanitize(text: str) -> str:
    # Keys must have no dots (webdataset splits key and extension at the first dot) and stay ASCII.
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def base_key(class_name: str, rel_in_class: str) -> str:
    stem = sanitize(rel_in_class.rsplit(".", 1)[0] if "." in Path(rel_in_class).name else rel_in_class)
    prefix = sanitize(class_name) + "_"
    # ImageNet's train files are already named `<wnid>_<n>`; don't say the wnid twice.
    key = stem if stem.startswith(prefix) else prefix + stem
    return key[:MAX_KEY]


def assign_keys(items: list) -> list:
    """Unique keys for (relpath, class_name, rel_in_class) items; colliding ones all get a path hash."""
    bases = [base_key(c, r) for _, c, r in items]
    counts = {}
    for b in bases:
        counts[b] = counts.get(b, 0) + 1
    keys = []
    for (relpath, _, _), b in zip(items, bases):
        if counts[b] > 1:
            b = f"{b[:MAX_KEY - 9]}_{hashlib.sha1(relpath.encode()).hexdigest()[:8]}"
        keys.append(b)
    if len(set(keys)) != len(keys):
        raise RuntimeError("internal error: sample keys are not unique")
    return keys


def keyed_entries(items: list, classes: list) -> list:
    """Entries for (path, label, name within its class, loc) items of another source, in an ImageFolder's order
    (class, then name) and with the keys an ImageFolder of the same files gets."""
    items = sorted(items, key=lambda it: (it[1], it[2]))
    keys = assign_keys([(path, classes[label], name) for path, label, name, _ in items])
    return [Entry(path, label, key, loc) for (path, label, _, loc), key in zip(items, keys)]


def _walk_files(src: Path, root: Path, seen: dict, foreign: dict):
    """(path, inside a hidden folder, None) for every file under `root`, in a sorted, repeatable order, and
    (folder, _, reason) for a folder not read: one that cannot be listed, or one `seen` already ({(device, inode):
    its path under `src`}), reached again through a link (a loop, or two links to one folder): its files are read
    once, under one label. Links to folders elsewhere are followed (a class folder may live on another disk), but not
    into another split's folder (`foreign`: {split: its real path}): train never reads val's images, nor val train's."""
    def walk(folder: Path, hidden: bool):
        real = os.path.realpath(folder)
        into = next((s for s, r in foreign.items() if real == r or real.startswith(r + os.sep)), None)
        if into:
            yield folder, hidden, f"a link into {into}/: another split's images are not read here"
            return
        try:
            st = folder.stat()
            ident = (st.st_dev, st.st_ino)
            if ident in seen:
                yield folder, hidden, f"a link to a folder already read ({seen[ident]}): not read twice"
                return
            seen[ident] = folder.relative_to(src).as_posix()
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            yield folder, hidden, f"cannot read this folder ({e.strerror or e})"
            return
        folders = []
        for e in entries:
            try:
                is_folder = e.is_dir()  # through links
            except OSError:
                is_folder = False  # a link that cannot be followed: a file, whose read says why
            if is_folder:
                folders.append(e)
            else:
                yield Path(e.path), hidden, None
        for e in folders:
            yield from walk(Path(e.path), hidden or is_ignored(e.name))

    yield from walk(root, False)


def scan_split(src: Path, split: str, classes: list, digest, seen: dict, foreign: dict) -> SplitScan:
    """Sort every file of one split into candidates, scan-time rejects and ignored files. A class folder of this split
    that gives no candidate is rejected by name: its class would silently get no samples."""
    result = SplitScan(split)
    split_dir = src / split
    label_of = {c: i for i, c in enumerate(classes)}
    items, labels, named = [], [], set()  # named: class folders a candidate or a folder problem came from
    for path, in_hidden, problem in _walk_files(src, split_dir, seen, foreign):
        relpath = path.relative_to(src).as_posix()
        if problem:
            result.rejected.append({"split": split, "path": relpath + "/", "reason": problem})
            named.update(path.relative_to(split_dir).parts[:1])
            continue
        add_to_fingerprint(digest, relpath, path)
        parts = path.relative_to(split_dir).parts
        if in_hidden or is_ignored(path.name):
            result.ignored.append({"split": split, "path": relpath, "reason": "hidden or system file"})
        elif len(parts) < 2:
            result.rejected.append({"split": split, "path": relpath, "reason": "not inside a class folder"})
        else:
            items.append((relpath, parts[0], "/".join(parts[1:])))
            labels.append(label_of[parts[0]])
            named.add(parts[0])
    for c in class_dirs(split_dir):
        if c not in named:
            result.rejected.append({"split": split, "path": f"{split}/{c}/", "reason": f"no image files: class {c} "
                                                                                    f"gets no {split} samples"})
    keys = assign_keys(items)
    result.entries = [Entry(it[0], lab, key) for it, lab, key in zip(items, labels, keys)]
    return result


def scan(src: Path) -> Scan:
    """Scan `src/train` and `src/val`; labels come from train's class folders (val's must be a subset)."""
    present = [s for s in SPLITS if (src / s).is_dir()]
    if not present:
        raise UsageError(f"{src} has neither a train/ nor a val/ folder")
    per_split = {s: class_dirs(src / s) for s in present}
    classes = per_split.get("train", per_split.get("val"))
    if "train" in per_split and "val" in per_split:
        extra = sorted(set(per_split["val"]) - set(per_split["train"]))
        if extra:
            raise UsageError(f"val/ has {len(extra)} class folders missing from train/, e.g. {extra[:3]}")
    for s in present:
        if not per_split[s]:
            raise UsageError(f"{src / s} has no class folders (flat layout? sort files into <class>/ folders)")
    digest = hashlib.sha256("\n".join(classes).encode())
    seen, real = {}, {s: os.path.realpath(src / s) for s in present}  # folders read, across the splits
    splits = {s: scan_split(src, s, classes, digest, seen, {o: r for o, r in real.items() if o != s}) for s in present}
    return Scan(classes, splits, digest.hexdigest(), FileReader(src))
