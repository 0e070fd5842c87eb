"""Repack an ImageFolder as ImageNet's other forms: the ILSVRC2012 downloads, Hugging Face parquet, webdataset tars.

    python tools/repack_imagefolder.py SRC OUT --form ilsvrc|parquet|wds

Each form holds exactly SRC's images and labels (`pipeline/shards/repack.py`), so `tools/make_shards.py` can be
checked (tests/) and timed (`tools/bench_shards.py --sources`) on every form against the ImageFolder itself.
ilsvrc: OUT gets `ILSVRC2012_img_train.tar` (a `<class>.tar` per class), `ILSVRC2012_img_val.tar` (SRC's val files
must be named `ILSVRC2012_val_<8 digits>.JPEG`, as `tools/make_sample_data.py` names them) and a devkit (meta.mat
written with scipy); parquet: `data/{train,validation}-0000i-of-0000n.parquet` as the datasets library writes them
(pyarrow); wds: `{train,val}-00000i.tar` of `<stem>.jpg` + `<stem>.cls` (webdataset) and `classes.json`.
Made for folders of the tests' and the benchmark's size: a class tar, and a parquet file, is built in memory.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.shards.repack import FORMS


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path, help="ImageFolder root (train/, val/)")
    p.add_argument("out", type=Path, help="folder to write the form into (created)")
    p.add_argument("--form", choices=sorted(FORMS), required=True)
    args = p.parse_args(argv)
    if not (args.src / "train").is_dir() or not (args.src / "val").is_dir():
        print(f"repack_imagefolder: error: {args.src} has no train/ and val/ folders", file=sys.stderr)
        return 2
    try:
        FORMS[args.form](args.src, args.out)
    except (OSError, ValueError) as e:  # e.g. val files not named ILSVRC2012_val_<n>.JPEG for --form ilsvrc
        print(f"repack_imagefolder: error: {e}", file=sys.stderr)
        return 1
    print(f"{args.out}: {args.src} as {args.form}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
