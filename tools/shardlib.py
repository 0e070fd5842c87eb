"""Pieces of `make_shards.py`: scan an ImageFolder, plan shards, check/convert images, write one shard.

The parent process scans and plans; `build_shard` is what a worker runs. Everything here is a pure
function of its arguments, so a shard's bytes depend only on the source files and the settings.
"""
import hashlib
import io
import os
import random
import re
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from tools import atomicio

FORMAT = "vitshards-1"
SPLITS = ("train", "val")
PARTS_DIR = ".parts"  # one small JSON record per finished shard: the resume log
IGNORED_NAMES = {"thumbs.db", "desktop.ini", "ehthumbs.db"}
MAX_KEY = 80  # keeps `<key>.jpg` within ustar's 100-byte name field
# Fixed tar header fields: the same input gives byte-identical shards on any machine, any day.
TAR_MTIME = 0
TAR_MODE = 0o444


class Rejected(Exception):
    """A source file that cannot become a sample; the message is the reason recorded in the manifest."""


class ShardWriteError(Exception):
    """Writing a shard failed (e.g. disk full); the whole run stops."""


@dataclass
class SplitScan:
    name: str
    entries: list = field(default_factory=list)  # (relpath, label, key) of image candidates, by relpath
    rejected: list = field(default_factory=list)  # files rejected without reading them
    ignored: list = field(default_factory=list)  # hidden/system files, by name
    num_files: int = 0


@dataclass
class Scan:
    classes: list
    splits: dict  # split name -> SplitScan
    fingerprint: str  # sha256 over (split, path, size, mtime) of every file


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


def _walk_files(root: Path):
    """(path, inside_hidden_folder) of every file under root, in a sorted, repeatable order."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        hidden = any(is_ignored(p) for p in Path(dirpath).relative_to(root).parts)
        for name in sorted(filenames):
            yield Path(dirpath) / name, hidden


def scan_split(src: Path, split: str, classes: list, digest) -> SplitScan:
    """Sort every file of one split into candidates, scan-time rejects and ignored files."""
    result = SplitScan(split)
    split_dir = src / split
    label_of = {c: i for i, c in enumerate(classes)}
    items, labels = [], []
    for path, in_hidden in _walk_files(split_dir):
        relpath = path.relative_to(src).as_posix()
        result.num_files += 1
        try:
            st = path.stat()
            digest.update(f"{relpath}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
        except OSError:
            digest.update(f"{relpath}\0broken\n".encode("utf-8", "surrogateescape"))
        parts = path.relative_to(split_dir).parts
        if in_hidden or is_ignored(path.name):
            result.ignored.append({"split": split, "path": relpath, "reason": "hidden or system file"})
        elif len(parts) < 2:
            result.rejected.append({"split": split, "path": relpath, "reason": "not inside a class folder"})
        else:
            items.append((relpath, parts[0], "/".join(parts[1:])))
            labels.append(label_of[parts[0]])
    keys = assign_keys(items)
    result.entries = [(it[0], lab, key) for it, lab, key in zip(items, labels, keys)]
    return result


class UsageError(Exception):
    """Bad input the user must fix (reported in one line, exit status 2)."""


def scan_source(src: Path) -> Scan:
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
    splits = {s: scan_split(src, s, classes, digest) for s in present}
    return Scan(classes, splits, digest.hexdigest())


def plan_shards(split: SplitScan, seed: int, per_shard: int) -> list:
    """Shard contents as lists of entries: a seeded shuffle, so every shard mixes classes."""
    order = list(split.entries)
    # A str seed is hashed with sha512 by `random`, so this is stable across runs and machines.
    random.Random(f"{FORMAT}:{seed}:{split.name}").shuffle(order)
    return [order[i:i + per_shard] for i in range(0, len(order), per_shard)]


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


def _decode_error(fmt: str, err: Exception) -> str:
    text = str(err) or type(err).__name__
    return f"truncated {fmt}: {text}" if "truncated" in text.lower() else f"corrupt {fmt}: {text}"


def _sniff(data: bytes) -> str:
    """Format name for messages about files whose header Pillow could not parse."""
    if data[:2] == b"\xff\xd8":
        return "JPEG"
    return "PNG" if data[:8] == b"\x89PNG\r\n\x1a\n" else "image"


def _has_jpeg_end(data: bytes) -> bool:
    # Entropy-coded data never holds FF D9 (0xFF is byte-stuffed), so an EOI marker near the end
    # means the stream was not cut short. Some encoders append padding, hence the 1 KiB window.
    return data[:2] == b"\xff\xd8" and data.rfind(b"\xff\xd9", max(0, len(data) - 1024)) >= 0


def prepare_image(data: bytes, max_side, quality: int, check: str) -> tuple:
    """(bytes to store, conversion reason or None); raises Rejected for what Pillow cannot decode.

    RGB JPEGs are stored untouched unless `max_side` asks for a resize. Anything else that decodes
    (CMYK or grayscale JPEG, PNG under a .JPEG name, ...) becomes an RGB JPEG, exactly the pixels an
    ImageFolder loader's `.convert("RGB")` would have produced.
    """
    if not data:
        raise Rejected("empty file (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise Rejected("not an image (Pillow cannot identify it)") from None
    except Image.DecompressionBombError as e:
        raise Rejected(f"too large: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise Rejected(_decode_error(_sniff(data), e)) from None
    with im:
        fmt, mode, (w, h) = im.format or "image", im.mode, im.size
        too_big = bool(max_side) and max(w, h) > max_side
        # MPO is a camera JPEG with extra frames appended; its first frame is a plain JPEG stream.
        keep = fmt in ("JPEG", "MPO") and mode == "RGB" and not too_big
        if keep and check == "header":
            if not _has_jpeg_end(data):
                raise Rejected(f"truncated {fmt}: no end-of-image marker")
            return data, None
        new_size = (w, h)
        if keep:
            # Kept bytes need no pixels, only proof that the whole stream decodes: at 1/8 DCT scale libjpeg still
            # entropy-decodes every block (where truncation and corruption show) but skips most of the IDCT and
            # colour work, about 1.5x faster than a full decode.
            im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
        if too_big:
            scale = max_side / max(w, h)
            new_size = (max(1, round(w * scale)), max(1, round(h * scale)))
            # JPEG only: decode at a reduced DCT scale >= the target size; all data is still read.
            im.draft("RGB", new_size)
        try:
            im.load()
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise Rejected(_decode_error(fmt, e)) from None
        if keep:
            return data, None
        reasons = [f"{fmt} -> JPEG"] if fmt not in ("JPEG", "MPO") else []
        if mode != "RGB":
            reasons.append(f"{mode} -> RGB")
        rgb = im.convert("RGB")
        if too_big:
            rgb = rgb.resize(new_size, Image.Resampling.LANCZOS)
            reasons.append(f"resized {w}x{h} -> {new_size[0]}x{new_size[1]}")
        out = io.BytesIO()
        rgb.save(out, "JPEG", quality=quality)
        return out.getvalue(), "; ".join(reasons)


class _HashingWriter:
    """File wrapper that hashes and counts what tarfile writes, so the shard is never read back."""

    def __init__(self, f):
        self.f, self.sha, self.pos = f, hashlib.sha256(), 0

    def write(self, b):
        self.sha.update(b)
        self.pos += len(b)
        return self.f.write(b)

    def tell(self):
        return self.pos


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> int:
    """Append one file; returns the offset of its data (what DALI's index needs)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), TAR_MTIME, TAR_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))
    # After addfile, tar.offset is just past the data padded to whole 512-byte blocks.
    return tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def index_text(lines: list) -> str:
    """DALI `wds2idx` v1.2 index: `v1.2 <samples>`, then per sample `<ext> <offset> <size> <name>` ..."""
    return "".join([f"v1.2 {len(lines)}\n"] + [line + "\n" for line in lines])


def _write_tar(tmp: Path, src: Path, entries: list, split: str, settings: dict) -> dict:
    """Write the samples of one shard to `tmp`; returns the shard's record (without file names)."""
    rec = {"num_samples": 0, "read_bytes": 0, "converted": [], "rejected": [], "index": []}
    with open(tmp, "wb") as raw:
        out = _HashingWriter(raw)
        # Plain tarfile rather than webdataset's ShardWriter: we need fixed header fields for
        # byte-identical reruns, temp-name + rename atomicity, and each member's data offset.
        # copybufsize: one write per member instead of 16 KiB pieces.
        with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT, copybufsize=1 << 24) as tar:
            for relpath, label, key in entries:
                try:
                    data = (src / relpath).read_bytes()
                    rec["read_bytes"] += len(data)
                    jpg, reason = prepare_image(data, settings["max_side"], settings["quality"],
                                                settings["check"])
                except (Rejected, OSError) as e:
                    why = str(e) if isinstance(e, Rejected) else f"cannot read: {e.strerror or e}"
                    rec["rejected"].append({"split": split, "path": relpath, "reason": why})
                    continue
                if reason:
                    rec["converted"].append({"split": split, "path": relpath, "key": key, "reason": reason})
                cls = str(label).encode("ascii")
                jpg_at = _add_member(tar, f"{key}.jpg", jpg)
                cls_at = _add_member(tar, f"{key}.cls", cls)
                rec["index"].append(f"jpg {jpg_at} {len(jpg)} {key}.jpg cls {cls_at} {len(cls)} {key}.cls")
                rec["num_samples"] += 1
        raw.flush()
        os.fsync(raw.fileno())
    rec["bytes"], rec["sha256"] = out.pos, out.sha.hexdigest()
    return rec


def build_shard(job: tuple) -> dict:
    """Worker entry point: write `<name>.tar`, `<name>.idx`, then the `.parts/<name>.json` record.

    job = (split, index, entries, src, dst, settings, plan_id). The record is written last and
    atomically, so its presence (with matching plan id and sizes) proves the shard is complete.
    """
    split, index, entries, src, dst, settings, plan_id = job
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    name = shard_name(split, index)
    tar_path, idx_path = dst / f"{name}.tar", dst / f"{name}.idx"
    tmp = atomicio.temp_path(tar_path)
    try:
        rec = _write_tar(tmp, src, entries, split, settings)  # fsync'd: the shard is the costly part
        index = index_text(rec.pop("index")).encode()
        # The small files are not fsync'd one by one: the record stores the index size, and a record
        # or index lost to a power cut only makes the next run rebuild this shard.
        atomicio.write_bytes(idx_path, index, fsync=False)
        atomicio.finish_temp(tmp, tar_path, fsync=False)
        atomicio.fsync_dir(dst)  # both renames are durable before the record says "done"
        rec.update({"plan_id": plan_id, "split": split, "name": f"{name}.tar", "index": f"{name}.idx",
                    "index_bytes": len(index)})
        atomicio.write_json(dst / PARTS_DIR / f"{name}.json", rec, fsync=False)
    except OSError as e:
        raise ShardWriteError(f"writing {name}: {e.strerror or e} ({e.filename or dst})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return rec
