"""The ILSVRC2012 downloads as a shard source: the files `torchvision.datasets.ImageNet(root)` takes, read in place.

`ILSVRC2012_img_train.tar` holds one `<wnid>.tar` per class; `ILSVRC2012_img_val.tar` holds the 50,000 val images in
one folder, labelled by the devkit (`ILSVRC2012_devkit_t12.tar.gz`: `meta.mat` maps ILSVRC2012 ids to wnids, the
ground truth lists one id per val image in file-name order), read with scipy as torchvision does. Classes are the sorted
wnids and keys are those of an ImageFolder of the same images (`train/<wnid>/<file>`, `val/<wnid>/<file>`), so both
sources plan the same shards, byte for byte.
"""
from __future__ import annotations

import hashlib
import io
import re
import tarfile
from pathlib import Path

from pipeline.shards import tarindex
from pipeline.shards.errors import UsageError
from pipeline.shards.imagefolder import is_ignored, keyed_entries
from pipeline.shards.source import Scan, SplitScan, add_to_fingerprint

TRAIN_TAR, VAL_TAR, DEVKIT = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"
META = "ILSVRC2012_devkit_t12/data/meta.mat"
GROUND_TRUTH = "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt"
VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG$")


def is_ilsvrc(src: Path) -> bool:
    return (src / TRAIN_TAR).is_file() or (src / VAL_TAR).is_file()


def read_devkit(path: Path) -> tuple[dict, list]:
    """({ILSVRC2012 id: wnid} of the 1,000 leaf classes, the val ground truth: one id per image, in name order)."""
    try:
        import scipy.io
    except ImportError:
        raise UsageError("reading the ILSVRC2012 devkit needs scipy: pip install 'vit-fast[sources]'") from None
    try:
        with tarfile.open(path, "r:gz") as tar:
            meta, truth = (tar.extractfile(name).read() for name in (META, GROUND_TRUTH))
        synsets = scipy.io.loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
        leaves = {int(i): str(w) for i, w, n in zip(synsets["ILSVRC2012_ID"], synsets["WNID"],
                                                    synsets["num_children"]) if int(n) == 0}
        return leaves, [int(x) for x in truth.split()]
    except (OSError, tarfile.TarError, KeyError, ValueError, AttributeError, TypeError) as e:
        # KeyError: a member or a meta.mat field missing; the rest: not a gzip'd tar, not a MAT file
        raise UsageError(f"{path}: not a readable ILSVRC2012 devkit ({type(e).__name__}: {e})") from None


def _problem(split: str, where: str, listing: tarindex.Listing) -> list:
    if not listing.problem:
        return []
    member, reason = listing.problem
    return [{"split": split, "path": f"{where}/{member}" if member else where, "reason": reason}]


def scan_train(src: Path, workers: int, devkit_classes: list) -> tuple[list, SplitScan]:
    """The class list and the train split. The classes are the devkit's (so labels are ImageNet's own even if a class
    tar is missing, which is named), else the sorted wnids of the class tars."""
    split, outer = SplitScan("train"), tarindex.list_members(src / TRAIN_TAR)
    class_tars = list(outer.members) + ([outer.cut] if outer.cut else [])  # a cut class tar: what of it exists
    if not outer.cut:  # a cut one's listing names the image the file ends in
        split.rejected += _problem("train", TRAIN_TAR, outer)
    tars, known = [], set(devkit_classes)
    for name, offset, size in class_tars:
        if not (name.endswith(".tar") and "/" not in name):
            reason = "not a <wnid>.tar"
        elif known and name[:-4] not in known:
            reason = "not a class of the devkit"
        else:
            tars.append((name, offset, size))
            continue
        split.rejected.append({"split": "train", "path": f"{TRAIN_TAR}/{name}", "reason": reason})
    classes = devkit_classes or sorted(name[:-4] for name, _, _ in tars)
    label_of = {c: i for i, c in enumerate(classes)}
    for wnid in sorted(known - {name[:-4] for name, _, _ in tars}):
        split.rejected.append({"split": "train", "path": f"{TRAIN_TAR}/{wnid}.tar",
                               "reason": "missing: the devkit lists this class"})
    listings = tarindex.list_many([(src / TRAIN_TAR, offset, size) for _, offset, size in tars], workers,
                                  "list class tars")
    items = []
    for (name, _, _), listing in zip(tars, listings):
        where = f"{TRAIN_TAR}/{name}"
        split.rejected += _problem("train", where, listing)
        for member, offset, size in listing.members:
            path = f"{where}/{member}"
            if is_ignored(Path(member).name):
                split.ignored.append({"split": "train", "path": path, "reason": "hidden or system file"})
            else:
                items.append((path, label_of[name[:-4]], member, (TRAIN_TAR, offset, size)))
    split.entries = keyed_entries(items, classes)
    return classes, split


def scan_val(src: Path, classes: list, wnid_of: dict, truth: list) -> SplitScan:
    split, listing = SplitScan("val"), tarindex.list_members(src / VAL_TAR)
    split.rejected += _problem("val", VAL_TAR, listing)
    label_of, items = {c: i for i, c in enumerate(classes)}, []
    for member, offset, size in listing.members:
        path, match = f"{VAL_TAR}/{member}", VAL_NAME.search(member)
        number = int(match.group(1)) if match else 0
        wnid = wnid_of.get(truth[number - 1]) if 0 < number <= len(truth) else None
        if is_ignored(Path(member).name):
            split.ignored.append({"split": "val", "path": path, "reason": "hidden or system file"})
        elif wnid is None:
            split.rejected.append({"split": "val", "path": path, "reason": "no ground-truth label in the devkit"})
        elif wnid not in label_of:
            split.rejected.append({"split": "val", "path": path, "reason": f"class {wnid} has no train class tar"})
        else:
            items.append((path, label_of[wnid], Path(member).name, (VAL_TAR, offset, size)))
    split.entries = keyed_entries(items, classes)
    return split


def scan(src: Path, workers: int = 1) -> Scan:
    digest = hashlib.sha256(b"ilsvrc2012\n")
    for name in (TRAIN_TAR, VAL_TAR, DEVKIT):
        if (src / name).is_file():
            add_to_fingerprint(digest, name, src / name)
    has_devkit = (src / DEVKIT).is_file()
    wnid_of, truth = read_devkit(src / DEVKIT) if has_devkit else ({}, [])
    splits = {}
    if (src / TRAIN_TAR).is_file():
        classes, splits["train"] = scan_train(src, workers, sorted(wnid_of.values()))
    else:
        classes = sorted(wnid_of.values())
    if (src / VAL_TAR).is_file():
        if not has_devkit:
            raise UsageError(f"{src / VAL_TAR}: val labels come from the devkit; put {DEVKIT} beside it")
        splits["val"] = scan_val(src, classes, wnid_of, truth)
    if not classes:
        raise UsageError(f"{src / TRAIN_TAR}: holds no <wnid>.tar class tars")
    digest.update("\n".join(classes).encode())
    return Scan(classes, splits, digest.hexdigest(), tarindex.TarReader(src))
