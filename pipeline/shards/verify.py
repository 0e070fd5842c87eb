"""`tools/make_shards.py --verify`: re-read every shard and check it against the manifest and the source tree.

Checks per shard: size and sha256 as in the manifest; members come as `<key>.jpg`, `<key>.cls` pairs;
the `.idx` lines point at exactly those bytes; the samples are the planned source files minus the
rejected ones, each with its label; unconverted images are byte-identical to their source file (in a set made
with restart markers: decode to its pixels, and carry the markers) and converted ones decode as RGB JPEGs.
Per split: shard samples + rejected + ignored == files in SRC.
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
from pipeline.shards.errors import ShardError
from pipeline.shards.format import Manifest, ShardInfo, read_index
from pipeline.shards.imagefolder import Scan, plan_shards


def read_tar(blob: bytes) -> list:
    """[(key, label, jpg bytes, {ext: (offset, size)})] in tar order; raises ValueError on bad pairs."""
    members = []
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tar:
        for m in tar:
            members.append((m.name, m.offset_data, m.size))
    if len(members) % 2:
        raise ValueError("odd number of members")
    out = []
    for (jname, joff, jsize), (cname, coff, csize) in zip(members[::2], members[1::2]):
        key = jname.removesuffix(".jpg")
        if not jname.endswith(".jpg") or cname != f"{key}.cls":
            raise ValueError(f"members {jname}, {cname} are not a <key>.jpg/<key>.cls pair")
        label = int(blob[coff:coff + csize].decode("ascii"))
        out.append((key, label, blob[joff:joff + jsize], {"jpg": (joff, jsize), "cls": (coff, csize)}))
    return out


def same_pixels(a: bytes, b: bytes) -> bool:
    with Image.open(io.BytesIO(a)) as x, Image.open(io.BytesIO(b)) as y:
        return x.size == y.size and np.array_equal(np.asarray(x.convert("RGB")), np.asarray(y.convert("RGB")))


def check_shard(src: Path, dst: str | Path, shard: ShardInfo, entries: list, split_rej: set, converted: set,
                recoded: bool = False) -> list:
    """Problems found in one shard (empty list when it is fine); `recoded`: the set has restart markers."""
    name = shard.name
    blob = storage.read_bytes(storage.join(dst, name))
    if len(blob) != shard.bytes or hashlib.sha256(blob).hexdigest() != shard.sha256:
        return [f"{name}: size or sha256 differs from the manifest"]
    try:
        samples = read_tar(blob)
        index = read_index(storage.join(dst, shard.index))
    except (OSError, ValueError, tarfile.TarError, ShardError) as e:
        return [f"{name}: {e}"]
    problems = []
    if len(samples) != shard.num_samples:
        problems.append(f"{name}: {len(samples)} samples, manifest says {shard.num_samples}")
    if [(k, spans) for k, _, _, spans in samples] != index:
        problems.append(f"{shard.index}: does not match the members of {name}")
    expected = [(p, lab, key) for p, lab, key in entries if p not in split_rej]
    if [k for k, _, _, _ in samples] != [key for _, _, key in expected]:
        return problems + [f"{name}: keys differ from the planned source files"]
    for (key, label, jpg, _), (path, want_label, _) in zip(samples, expected):
        if label != want_label:
            problems.append(f"{name}/{key}: label {label}, expected {want_label} ({path})")
        if path in converted:
            with Image.open(io.BytesIO(jpg)) as im:
                if im.format != "JPEG" or im.mode != "RGB":
                    problems.append(f"{name}/{key}: converted image is {im.format} {im.mode}")
        elif recoded:
            if jpeg.decoder_available("region") and not jpeg.has_restart_markers(jpg):  # its C parser reads them
                problems.append(f"{name}/{key}: no restart markers")
            elif not same_pixels(jpg, (src / path).read_bytes()):
                problems.append(f"{name}/{key}: pixels differ from {path}")
        elif jpg != (src / path).read_bytes():
            problems.append(f"{name}/{key}: bytes differ from {path}")
    return problems


def verify(src: Path, dst: str | Path, scan: Scan, manifest: Manifest, limit: int = 20) -> list:
    """Check all shards; prints the result and returns the list of problems."""
    problems = []
    rejected = {r["path"] for r in manifest.rejected}
    converted = {c["path"] for c in manifest.converted}
    for name, split in scan.splits.items():
        info = manifest.splits[name]
        if info.num_samples + info.num_rejected + info.num_ignored != split.num_files:
            problems.append(f"{name}: samples + rejected + ignored != {split.num_files} files in SRC")
        plan = plan_shards(split, manifest.settings.seed, manifest.settings.samples_per_shard)
        if len(plan) != len(info.shards):
            problems.append(f"{name}: {len(info.shards)} shards, the plan has {len(plan)}")
            continue
        for shard, entries in tqdm(list(zip(info.shards, plan)), desc=f"verify {name}", unit="shard"):
            try:
                problems += check_shard(src, dst, shard, entries, rejected, converted,
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
