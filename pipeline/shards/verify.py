"""`tools/make_shards.py --verify`: re-read every shard and check it against the manifest and the source.

Checks per shard: size and sha256 as in the manifest; the `.idx` lines point at exactly the tar's members (as
tarfile lists them), `<key>.jpg` then `<key>.cls` per sample; the samples, read as the loaders read them
(`pipeline/shards/reader.py`), are the planned source files minus the rejected ones, each with its label;
unconverted images are byte-identical to their source bytes, as the source's reader reads them (in a set made with
restart markers: decode to its pixels, and carry the markers) and converted ones decode as RGB JPEGs.
Per split: shard samples + rejected + ignored == what the scan found in SRC (files, images of its tars, samples of
webdataset tars, rows of parquet files).
"""
from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.shards import jpeg, storage
from pipeline.shards.contents import members_mismatch
from pipeline.shards.errors import SampleError, ShardError
from pipeline.shards.format import IMAGE, LABEL, MEMBERS, Manifest, Shard, ShardInfo, read_index
from pipeline.shards.source import Scan, plan_shards
from pipeline.shards.reader import samples_in, usable_label


def same_pixels(a: bytes, b: bytes) -> bool:
    with Image.open(io.BytesIO(a)) as x, Image.open(io.BytesIO(b)) as y:
        return x.size == y.size and np.array_equal(np.asarray(x.convert("RGB")), np.asarray(y.convert("RGB")))


def check_shard(reader, dst: str | Path, shard: ShardInfo, entries: list, split_rej: set, converted: set,
                recoded: bool = False) -> list:
    """Problems found in one shard (empty list when it is fine); `reader`: the source's (source.py), `entries`: the
    shard's planned ones; `recoded`: the set has restart markers."""
    name = shard.name
    blob = storage.read_bytes(storage.join(dst, name))
    if len(blob) != shard.bytes or hashlib.sha256(blob).hexdigest() != shard.sha256:
        return [f"{name}: size or sha256 differs from the manifest"]
    try:
        index = read_index(storage.join(dst, shard.index), file_bytes=shard.bytes)
        mismatch = members_mismatch(blob, index)  # the index must point at exactly the tar's members
    except (OSError, tarfile.TarError, ShardError) as e:
        return [f"{name}: {e}"]
    problems = []
    if len(index) != shard.num_samples:
        problems.append(f"{name}: {len(index)} samples, manifest says {shard.num_samples}")
    if mismatch:
        problems.append(f"{shard.index}: does not match the members of {name} ({mismatch})")
    if any(set(parts) != set(MEMBERS) for _, parts in index):
        return problems + [f"{name}: a sample without both <key>.{IMAGE} and <key>.{LABEL}"]
    try:  # the samples as every loader reads them
        samples = [(s.key, usable_label(s, None), s.jpg) for s in samples_in(Shard(name, shard.index, len(index)),
                                                                            index, blob)]
    except SampleError as e:
        return problems + [str(e)]
    expected = [e for e in entries if e.path not in split_rej]
    if [k for k, _, _ in samples] != [e.key for e in expected]:
        return problems + [f"{name}: keys differ from the planned source files"]
    source = {e.key: data for e, data in reader.read_all(expected)}
    for (key, label, jpg), (path, want_label, _, _) in zip(samples, expected):
        if label != want_label:
            problems.append(f"{name}/{key}: label {label}, expected {want_label} ({path})")
        if path in converted:
            with Image.open(io.BytesIO(jpg)) as im:
                if im.format != "JPEG" or im.mode != "RGB":
                    problems.append(f"{name}/{key}: converted image is {im.format} {im.mode}")
        elif recoded:
            if jpeg.decoder_available("region") and not jpeg.has_restart_markers(jpg):  # its C parser reads them
                problems.append(f"{name}/{key}: no restart markers")
            elif isinstance(source[key], str) or not same_pixels(jpg, source[key]):
                problems.append(f"{name}/{key}: pixels differ from {path}")
        elif jpg != source[key]:
            problems.append(f"{name}/{key}: bytes differ from {path}")
    return problems


def verify(dst: str | Path, scan: Scan, manifest: Manifest, limit: int = 20) -> list:
    """Check all shards; prints the result and returns the list of problems."""
    problems = []
    rejected = {r["path"] for r in manifest.rejected}
    converted = {c["path"] for c in manifest.converted}
    for name, split in scan.splits.items():
        info = manifest.splits[name]
        if info.num_samples + info.num_rejected + info.num_ignored != split.num_files:
            problems.append(f"{name}: samples + rejected + ignored != {split.num_files} files in SRC")
        plan = plan_shards(split, manifest.settings.seed, manifest.settings.samples_per_shard, scan.window)
        if len(plan) != len(info.shards):
            problems.append(f"{name}: {len(info.shards)} shards, the plan has {len(plan)}")
            continue
        for shard, entries in tqdm(list(zip(info.shards, plan)), desc=f"verify {name}", unit="shard"):
            try:
                problems += check_shard(scan.reader, dst, shard, entries, rejected, converted,
                                        manifest.settings.restart_markers)
            except OSError as e:
                problems.append(f"{shard.name}: {e.strerror or e} ({e.filename})")
            except ShardError as e:  # object storage
                problems.append(str(e))
    checked = sum(s.num_samples for s in manifest.splits.values())
    if problems:
        print(f"verify: FAILED, {len(problems)} problems:")
        for p in problems[:limit]:
            print(f"  {p}")
        if len(problems) > limit:
            print(f"  ... {len(problems) - limit} more")
    else:
        print(f"verify: OK, {checked} samples in {sum(len(s.shards) for s in manifest.splits.values())}"
              " shards match the manifest and the source files")
    return problems
