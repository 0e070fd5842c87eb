"""Hugging Face parquet files as a shard source (`train-*.parquet`, `validation-*.parquet`, anywhere under SRC).

The image column holds `{"bytes": ..., "path": ...}` structs (the datasets library's Image feature) or plain binary;
the label column is an integer (a ClassLabel, whose names the file's `huggingface` metadata gives, become the class
list; without them the classes are the label numbers). Columns are found by those features, else by name (image, img,
jpg; label, labels, cls). The scan reads only the label and image-path columns; the workers read image bytes in row
batches of one row group at a time, so memory stays bounded whatever the file size. Row groups cannot be read one row
at a time, so the plan deals rows among a window of shards (`source.plan_shards`); keys come from the image's `path`
where it has one, so they match an ImageFolder's.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tqdm import tqdm

from pipeline.shards.errors import UsageError
from pipeline.shards.imagefolder import keyed_entries
from pipeline.shards.source import Scan, SplitScan, add_to_fingerprint, by_split

WINDOW = 16  # shards one worker writes from one pass over their row groups (source.plan_shards)
IMAGE_NAMES, LABEL_NAMES = ("image", "img", "jpg"), ("label", "labels", "cls")
BATCH_ROWS = 64


def _pq():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError("reading parquet needs pyarrow: pip install 'vit-fast[sources]'") from None
    return pq


def _unreadable() -> tuple:
    """What pyarrow raises on a file it cannot read: ArrowInvalid (not parquet), OSError, and the ArrowException
    family (ArrowNotImplementedError: a codec this build lacks; ArrowTypeError)."""
    import pyarrow as pa

    return OSError, ValueError, pa.ArrowException


def files_of(src: Path) -> list[str]:
    """Parquet files anywhere under `src`, relative to it, sorted."""
    return sorted(p.relative_to(src).as_posix() for p in src.rglob("*.parquet") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(src).parts))


def columns(schema, where: str) -> tuple[str, str, list | None]:
    """(image column, label column, class names or None) of a parquet schema."""
    import pyarrow as pa

    features = {}
    meta = (schema.metadata or {}).get(b"huggingface")
    if meta:
        try:
            features = json.loads(meta).get("info", {}).get("features", {}) or {}
        except ValueError:
            features = {}
    names = schema.names
    image = next((n for n, f in features.items() if isinstance(f, dict) and f.get("_type") == "Image" and n in names),
                 next((n for n in IMAGE_NAMES if n in names), None))
    label = next((n for n, f in features.items() if isinstance(f, dict) and f.get("_type") == "ClassLabel"
                  and n in names), next((n for n in LABEL_NAMES if n in names), None))
    if image is None or label is None:
        raise UsageError(f"{where}: no {'image' if image is None else 'label'} column among {names}")
    kind = schema.field(image).type
    if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
            or (pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0)):
        raise UsageError(f"{where}: column {image!r} holds {kind}, not image bytes")
    if not pa.types.is_integer(schema.field(label).type):
        raise UsageError(f"{where}: column {label!r} holds {schema.field(label).type}, not integer labels")
    class_list = features.get(label, {}).get("names") if isinstance(features.get(label), dict) else None
    return image, label, class_list


def _split_rows(src: Path, split: str, files: list, image: str, label: str, pq) -> tuple[list, list]:
    """(label, name, (file, row group, row), shown path) per row, and the rows rejected at scan. The name is the
    file name of the image's `path` where it has one, else `<file stem>_<row>`."""
    rows, rejected = [], []
    for rel in tqdm(files, desc=f"scan {split}", unit="file", dynamic_ncols=True, disable=len(files) < 2):
        try:
            _file_rows(src, split, rel, image, label, pq, rows, rejected)
        except _unreadable() as e:
            raise UsageError(f"{src / rel}: unreadable parquet ({e})") from None
    return rows, rejected


def _file_rows(src: Path, split: str, rel: str, image: str, label: str, pq, rows: list, rejected: list) -> None:
    import pyarrow as pa

    pf = pq.ParquetFile(src / rel)
    kind = pf.schema_arrow.field(image).type
    has_path = pa.types.is_struct(kind) and kind.get_field_index("path") >= 0
    n = 0
    for rg in range(pf.metadata.num_row_groups):
        table = pf.read_row_group(rg, columns=[label] + ([f"{image}.path"] if has_path else []))
        labels = table.column(label).to_pylist()
        paths = ([(v or {}).get("path") for v in table.column(image).to_pylist()] if has_path
                 else [None] * len(labels))
        for row, (lab, path) in enumerate(zip(labels, paths)):
            shown = f"{rel}[{n}]"
            if lab is None or lab < 0:
                rejected.append({"split": split, "path": shown, "reason": f"no label ({lab})"})
            else:
                rows.append((lab, Path(path).name if path else f"{Path(rel).stem}_{n}", (rel, rg, row), shown))
            n += 1


def scan(src: Path) -> Scan:
    pq = _pq()
    per_split = by_split(files_of(src), "parquet files", src)
    digest = hashlib.sha256(b"parquet\n")
    splits, labels, rel = {}, set(), None
    try:
        first = next(iter(per_split.values()))[0]
        image, label, names = columns(pq.ParquetFile(src / first).schema_arrow, str(src / first))
        for split in ("train", "val"):
            for rel in per_split.get(split, []):
                add_to_fingerprint(digest, rel, src / rel)
                if columns(pq.ParquetFile(src / rel).schema_arrow, str(src / rel)) != (image, label, names):
                    raise UsageError(f"{src / rel}: other columns or class names than {first}")
            if split in per_split:
                rows, rejected = _split_rows(src, split, per_split[split], image, label, pq)
                splits[split] = (rows, rejected)
                labels |= {r[0] for r in rows}
    except _unreadable() as e:
        raise UsageError(f"{src / (rel or first)}: unreadable parquet ({e})") from None
    classes = names or [str(i) for i in range(max(labels, default=-1) + 1)]
    digest.update("\n".join(classes).encode())
    out = {}
    for split, (rows, rejected) in splits.items():
        result = SplitScan(split, rejected=rejected)
        kept = []
        for lab, name, loc, shown in rows:
            if lab >= len(classes):
                result.rejected.append({"split": split, "path": shown, "reason": f"label {lab} is not one of the "
                                                                                 f"{len(classes)} class names"})
            else:
                kept.append((shown, lab, name, loc))
        result.entries = keyed_entries(kept, classes)
        out[split] = result
    return Scan(classes, out, digest.hexdigest(), ParquetReader(src, image), window=WINDOW)


class ParquetReader:
    """Reads entries whose `loc` is (file, row group, row), given in that order, one row batch in memory at a time."""

    def __init__(self, root: Path, image: str):
        self.root, self.image = root, image

    def read_all(self, entries):
        pq, i, files = _pq(), 0, {}  # a file opened once: opening reads its footer, which lists every row group
        try:
            while i < len(entries):
                rel, rg = entries[i].loc[:2]
                j = i
                while j < len(entries) and entries[j].loc[:2] == (rel, rg):
                    j += 1
                yield from self._read_group(pq, files, rel, rg, entries[i:j])
                i = j
        finally:
            for f in files.values():
                f.close()

    def _read_group(self, pq, files: dict, rel: str, rg: int, group: list):
        wanted = {e.loc[2]: e for e in group}
        done = set()
        try:
            start = 0
            if rel not in files:
                files[rel] = pq.ParquetFile(self.root / rel)
            for batch in files[rel].iter_batches(batch_size=BATCH_ROWS, row_groups=[rg], columns=[self.image]):
                column = batch.column(0)
                # the image bytes alone (not the struct's path), converted once per batch rather than per row
                values = (column.field("bytes") if column.type.num_fields else column).to_pylist()
                for k, data in enumerate(values):
                    entry = wanted.get(start + k)
                    if entry is None:
                        continue
                    done.add(start + k)
                    yield entry, data if data is not None else "no image bytes (null)"
                start += len(values)
        except _unreadable() as e:
            for row, entry in wanted.items():
                if row not in done:
                    yield entry, f"cannot read: {e}"
            return
        for row, entry in wanted.items():
            if row not in done:
                yield entry, "cannot read: row missing from its row group"
