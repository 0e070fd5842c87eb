"""Which kind of source `--data_path` is, told apart by names alone, and its scan (`pipeline/shards/source.py`)."""
from __future__ import annotations

import os
from pathlib import Path

from pipeline.shards import ilsvrc, imagefolder, parquet, wds
from pipeline.shards.errors import UsageError
from pipeline.shards.format import SPLITS
from pipeline.shards.source import Scan


DESCRIPTIONS = {
    "imagefolder": "an ImageFolder (train/<class>/*, val/<class>/*)",
    "ilsvrc": f"the ILSVRC2012 downloads ({ilsvrc.TRAIN_TAR}, {ilsvrc.VAL_TAR}, {ilsvrc.DEVKIT}), read in place",
    "parquet": "Hugging Face parquet files (an image column of JPEG bytes, an integer label)",
    "wds": "webdataset tars (<key>.jpg + <key>.cls samples), re-sharded",
}


def _has_class_folders(folder: Path) -> bool:
    return folder.is_dir() and any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(folder))


def detect(src: Path) -> str:
    """What `src` holds, by names alone: 'ilsvrc' (the download tars), 'imagefolder' (train/ or val/ with class
    folders: checked before any walk of the tree), 'parquet', 'wds' (tars at the top or in train/, val/ folders), else
    'imagefolder' (whose scan says what is missing)."""
    if ilsvrc.is_ilsvrc(src):
        return "ilsvrc"
    if any(_has_class_folders(src / s) for s in SPLITS):
        return "imagefolder"
    if parquet.files_of(src):
        return "parquet"
    return "wds" if wds.tar_files(src) else "imagefolder"


def scan_source(src: Path, kind: str | None = None, workers: int = 1) -> Scan:
    """Scan `src` as `kind` (default: what it is detected to be); UsageError for a source that cannot be sharded,
    saying why."""
    if not src.is_dir():
        raise UsageError(f"--data_path {src} is not a folder")
    kind = kind or detect(src)
    if kind == "ilsvrc":
        return ilsvrc.scan(src, workers)
    if kind == "parquet":
        return parquet.scan(src)
    if kind == "wds":
        return wds.scan(src, workers)
    return imagefolder.scan(src)
