"""An ImageFolder written as ImageNet's other forms: the ILSVRC2012 downloads (nested class tars, a devkit written
with scipy), Hugging Face parquet files (pyarrow), webdataset tars. Each holds exactly the ImageFolder's images and
labels: what the source tests check make_shards against, and what `tools/bench_shards.py --sources` times.
`tools/repack_imagefolder.py` is its command line."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np

from pipeline.shards import ilsvrc
from pipeline.shards.imagefolder import class_dirs


def classes_of(folder: Path) -> list:
    return class_dirs(folder / "train")


def images(folder: Path, split: str) -> list:
    """(class, file) of every image of a split, sorted."""
    return sorted((p.parent.name, p) for p in (folder / split).glob("*/*") if p.is_file())


def _labels(classes: list) -> dict:
    return {c: i for i, c in enumerate(classes)}


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """`data` as the member `name` of `tar`."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_devkit(path: Path, classes: list, val_labels: list) -> None:
    """A devkit with meta.mat (the leaf synsets, ids 1.., plus one parent synset as the real one has) and the val
    ground truth: `val_labels` = the class of val image 1, 2, ..."""
    rows = [(i + 1, wnid, f"words of {wnid}", "gloss", 0) for i, wnid in enumerate(classes)]
    rows.append((len(classes) + 1, "n00000001", "entity", "gloss", len(classes)))
    synsets = np.array(rows, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"),
                                    ("num_children", "O")])
    import scipy.io

    mat = io.BytesIO()
    scipy.io.savemat(mat, {"synsets": synsets})
    label_of = _labels(classes)
    truth = "".join(f"{label_of[c] + 1}\n" for c in val_labels).encode()
    with tarfile.open(path, "w:gz") as tar:
        add_bytes(tar, ilsvrc.META, mat.getvalue())
        add_bytes(tar, ilsvrc.GROUND_TRUTH, truth)


def write_ilsvrc(folder: Path, out: Path) -> Path:
    """The three ILSVRC2012 downloads of an ImageFolder whose val files are named ILSVRC2012_val_<8 digits>.JPEG."""
    out.mkdir(parents=True, exist_ok=True)
    classes, by_class = classes_of(folder), {}
    for c, p in images(folder, "train"):
        by_class.setdefault(c, []).append(p)
    with tarfile.open(out / ilsvrc.TRAIN_TAR, "w", format=tarfile.USTAR_FORMAT) as outer:
        for c in classes:
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for p in by_class.get(c, []):
                    add_bytes(tar, p.name, p.read_bytes())
            add_bytes(outer, f"{c}.tar", inner.getvalue())
    val = sorted(images(folder, "val"), key=lambda im: im[1].name)
    odd = [p.name for _, p in val if not ilsvrc.VAL_NAME.fullmatch(p.name)]
    if odd:
        raise ValueError(f"val files must be named ILSVRC2012_val_<8 digits>.JPEG for --form ilsvrc, e.g. not {odd[0]}")
    numbers = [int(p.stem.rsplit("_", 1)[1]) for _, p in val]
    truth = [None] * max(numbers)
    for (c, _), n in zip(val, numbers):
        truth[n - 1] = c
    with tarfile.open(out / ilsvrc.VAL_TAR, "w", format=tarfile.USTAR_FORMAT) as tar:
        for _, p in val:
            add_bytes(tar, p.name, p.read_bytes())
    write_devkit(out / ilsvrc.DEVKIT, classes, [c or classes[0] for c in truth])
    return out


def write_parquet(folder: Path, out: Path, files_per_split: int = 2, row_group_size: int = 5,
                  with_names: bool = True) -> Path:
    """The datasets library's layout: data/{train,validation}-0000i-of-0000n.parquet, an Image struct column and a
    ClassLabel, rows in class order (as a pushed ImageFolder has them)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    classes = classes_of(folder)
    label_of = _labels(classes)
    features = {"image": {"_type": "Image"}, "label": {"_type": "ClassLabel", **({"names": classes} if with_names
                                                                                 else {})}}
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    (out / "data").mkdir(parents=True, exist_ok=True)
    for split, name in (("train", "train"), ("val", "validation")):
        ims = images(folder, split)
        for i in range(files_per_split):
            part = ims[i::files_per_split]
            table = pa.table({"image": pa.array([{"bytes": p.read_bytes(), "path": p.name} for _, p in part],
                                                type=image_type),
                              "label": pa.array([label_of[c] for c, _ in part], pa.int64())})
            pq.write_table(table.replace_schema_metadata(meta),
                           out / "data" / f"{name}-{i:05d}-of-{files_per_split:05d}.parquet",
                           row_group_size=row_group_size)
    return out


def write_wds(folder: Path, out: Path, per_tar: int = 20) -> Path:
    """webdataset tars (train-00000i.tar, val-00000i.tar) of `<stem>.jpg` + `<stem>.cls`, and classes.json."""
    import webdataset as wds

    classes = classes_of(folder)
    label_of = _labels(classes)
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        with wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=per_tar, verbose=0) as sink:
            for c, p in images(folder, split):
                sink.write({"__key__": p.stem, "jpg": p.read_bytes(), "cls": label_of[c]})
    (out / "classes.json").write_text(json.dumps(classes))
    return out


FORMS = {"ilsvrc": write_ilsvrc, "parquet": write_parquet, "wds": write_wds}
