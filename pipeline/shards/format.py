"""The shard set on disk, the one place that knows its file names and layouts; both the writer
(`pipeline/shards/writer.py`, driven by `tools/make_shards.py`) and every reader go through it.

A shard folder holds, per split, `<split>-NNNNNN.tar` (webdataset: `<key>.jpg` with the JPEG bytes, `<key>.cls` with
the ASCII decimal label) and `<split>-NNNNNN.idx` beside it (DALI's wds2idx v1.2 index: the byte offset and size of
every member, so readers seek instead of scanning), plus `classes.json` (class folder names, label order),
timm's `_info.json`, and `manifest.json`, written last: its presence means the set is complete. The folder may be an
S3 prefix (`s3://bucket/prefix`): every read goes through `pipeline/shards/storage.py`.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from pipeline.shards import atomicio, storage
from pipeline.shards.errors import ShardError

# The formats this version reads, and the one it writes. Each reads by its own rule (`settings_from`, `plan_fields`,
# `read_manifest`):
#   vitshards-1  fields added over its life may be absent: num_classes (classes.json has the classes), restart_markers
#                (no set had them) and any other setting (its default); its plan ids leave restart_markers out when
#                it is off, so such a set still resumes.
#   vitshards-2  every field present; the plan id covers every setting.
FORMATS = ("vitshards-1", "vitshards-2")
FORMAT = FORMATS[-1]
SPLITS = ("train", "val")
MANIFEST, CLASSES, TIMM_INFO = "manifest.json", "classes.json", "_info.json"
PLAN_FILE, PARTS_DIR = ".plan.json", ".parts"  # the writer's resume state: its plan, one record per finished shard
LOCK_FILE = ".lock"  # held by the one writer at work on a folder
INDEX_VERSION = "v1.2"
TIMM_SPLIT_NAMES = {"train": "train", "val": "validation"}  # timm's wds reader calls the held-out split "validation"
_SHARD_FILE = re.compile(rf"^({'|'.join(SPLITS)})-\d{{6}}\.(tar|idx)$")
_COUNT = re.compile(r"[0-9]+")
_SHA256 = re.compile(r"[0-9a-f]{64}")


# A sample's members, in the order the writer puts them in the tar: `<key>.jpg` (the JPEG bytes) and `<key>.cls`
# (the label, ASCII decimal). Keys hold no dots, so a member name splits at its last one.
IMAGE, LABEL = "jpg", "cls"
MEMBERS = (IMAGE, LABEL)


def member_name(key: str, member: str) -> str:
    return f"{key}.{member}"


def encode_label(label: int) -> bytes:
    return str(label).encode("ascii")


def decode_label(data: bytes) -> int:
    """The label a `.cls` member holds; ValueError when it holds none."""
    try:
        return int(data.decode("ascii").strip())
    except UnicodeDecodeError:
        raise ValueError(f"not ASCII: {data[:20]!r}") from None


def shard_name(split: str, index: int) -> str:
    """`train-000012`: the stem of a shard's .tar and .idx."""
    return f"{split}-{index:06d}"


def is_shard_file(name: str) -> bool:
    return bool(_SHARD_FILE.match(name))


# -- the .idx index (DALI's wds2idx v1.2) ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Shard:
    path: str  # the tar file
    index_path: str  # its index
    num_samples: int
    bytes: int | None = None  # the tar's size, as the manifest says
    problem: str | None = None  # why its bytes are not the manifest's (found at the start): each sample reports it


def index_line(key: str, members: list[tuple[str, int, int]]) -> str:
    """One sample's line: `<ext> <offset> <size> <key>.<ext>` for each (ext, data offset, size)."""
    return " ".join(f"{ext} {offset} {size} {member_name(key, ext)}" for ext, offset, size in members)


def index_text(lines: list[str]) -> str:
    return "".join([f"{INDEX_VERSION} {len(lines)}\n"] + [line + "\n" for line in lines])


def read_index(path: str | Path, num_samples: int | None = None,
               file_bytes: int | None = None) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """[(key, {ext: (offset, size)})] in the index's order. `num_samples`, when given, must match (the manifest's
    count), and every member must lie inside the tar's `file_bytes`. Lines may list members in any order, but no two
    members share a byte: an index that breaks that is damaged, and a ShardError names it."""
    try:
        lines = storage.read_bytes(path).decode().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: unreadable index ({e})") from e
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit():
        raise ShardError(f"{path}: not a wds2idx {INDEX_VERSION} index (first line {lines[:1]})")
    entries, spans = [], []
    for n, line in enumerate(lines[1:], start=2):
        words = line.split()
        if not words:
            continue
        if len(words) % 4:
            raise ShardError(f"{path}:{n}: expected groups of '<ext> <offset> <size> <filename>'; remake the shards")
        parts, key = {}, None
        for i in range(0, len(words), 4):
            ext, offset, size, name = words[i:i + 4]
            if not (_COUNT.fullmatch(offset) and _COUNT.fullmatch(size)):
                raise ShardError(f"{path}:{n}: {name}: offset {offset!r} and size {size!r} must be byte counts; "
                                 f"remake the shards")
            offset, size = int(offset), int(size)
            if file_bytes is not None and offset + size > file_bytes:
                raise ShardError(f"{path}:{n}: {name} at bytes {offset}-{offset + size} ends past the tar's "
                                 f"{file_bytes} bytes; remake the shards")
            spans.append((offset, size, n, name))
            parts[ext] = (offset, size)
            key = key or name.removesuffix("." + ext)  # keys hold no dots (the writer's rule), names are <key>.<ext>
        entries.append((key, parts))
    spans.sort()  # in any order the lines list them, no two members may share a byte
    for (o1, s1, _, name1), (o2, s2, n2, name2) in zip(spans, spans[1:]):
        if o2 < o1 + s1:
            raise ShardError(f"{path}:{n2}: {name2} at bytes {o2}-{o2 + s2} overlaps {name1} (bytes {o1}-{o1 + s1}); "
                             f"remake the shards")
    if len(entries) != int(head[1]) or (num_samples is not None and len(entries) != num_samples):
        manifest_says = f", manifest says {num_samples}" if num_samples is not None else ""
        raise ShardError(f"{path}: {len(entries)} samples listed, header says {head[1]}{manifest_says}; "
                         f"remake the shards")
    return entries


# -- the manifest ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardInfo:
    name: str  # tar file name, relative to the folder
    index: str  # .idx file name
    num_samples: int
    bytes: int
    sha256: str


@dataclass
class SplitInfo:
    num_samples: int
    bytes: int
    num_files: int  # in the source split: num_samples + num_rejected + num_ignored
    num_rejected: int
    num_ignored: int
    shards: list[ShardInfo]


@dataclass(frozen=True)
class Settings:
    """What decides a shard set's bytes (with the source files): a rerun with equal settings resumes."""

    format: str = FORMAT  # a set resumes in the format it was begun in
    seed: int = 0  # shuffle seed
    samples_per_shard: int = 1000  # ~110 MB shards for ImageNet
    max_side: int | None = None  # re-encode images whose longer side exceeds this (px); None keeps originals
    quality: int = 95  # JPEG quality of re-encoded images (conversions, resizes)
    check: str = "decode"  # decode: Pillow decodes every image; header: header + end-marker check only
    # Every JPEG re-encoded losslessly with a restart marker after each MCU (pipeline/shards/jpeg.py `recode`: the same
    # pixels), so the host decoder entropy-decodes only a crop's MCUs. False in sets made before the option.
    restart_markers: bool = False
    source: str = ""  # the source's absolute path (an ImageFolder, or a folder of tars or parquet files)


def settings_from(obj: dict, where: str) -> Settings:
    """The settings a manifest or plan file holds (at its top level), read by the rule of the format it names."""
    fmt = obj.get("format")
    if fmt not in FORMATS:
        raise ShardError(f"{where}: shard format {fmt!r}, which this version does not read (it reads "
                         f"{', '.join(FORMATS)}); remake the shards, or use the version that wrote them")
    found = {f.name: obj[f.name] for f in fields(Settings) if f.name in obj}
    missing = [f.name for f in fields(Settings) if f.name not in found]
    if missing and fmt != "vitshards-1":
        raise ShardError(f"{where}: a {fmt} manifest without {', '.join(missing)}; remake the shards")
    return Settings(**found)


def plan_fields(settings: Settings) -> dict:
    """The settings a plan id is made of."""
    out = asdict(settings)
    if settings.format == "vitshards-1" and not settings.restart_markers:
        del out["restart_markers"]
    return out


@dataclass
class Manifest:
    """manifest.json: the settings, the plan id, per-split shard lists, and every converted/rejected/ignored file."""

    settings: Settings
    plan_id: str
    num_classes: int
    splits: dict[str, SplitInfo]
    converted: list[dict] = field(default_factory=list)  # {split, path, key, reason}
    rejected: list[dict] = field(default_factory=list)  # {split, path, reason}
    ignored: list[dict] = field(default_factory=list)  # {split, path, reason}

    def to_json(self) -> dict:
        # Settings sit at the top level of the file, beside the rest (the layout existing shard sets have).
        out = {**asdict(self.settings), **asdict(self)}
        del out["settings"]
        return out

    @classmethod
    def from_json(cls, obj: dict, where: str, names: list[str] | None, names_where: str) -> "Manifest":
        """`names`: the set's class list (classes.json, at `names_where`), None where it has none. The manifest's
        `num_classes` must be its length (a vitshards-1 manifest that does not count them takes it); a set without
        the file has only the manifest's count to go by."""
        try:
            settings = settings_from(obj, where)
            splits = {name: SplitInfo(**{**s, "shards": [ShardInfo(**sh) for sh in s["shards"]]})
                      for name, s in obj["splits"].items()}
            counted = settings.format != "vitshards-1" or "num_classes" in obj
            plan_id, count = obj["plan_id"], obj["num_classes"] if counted else None
        except (KeyError, TypeError, AttributeError) as e:
            raise ShardError(f"{where}: not a manifest written by tools/make_shards.py ({type(e).__name__}: {e})") \
                from None
        _check_counts(splits, where)
        if count is None and names is None:
            raise ShardError(f"{names_where}: no class list, which this manifest's class count is taken from; remake "
                             f"the set")
        # The head's width comes from num_classes and the labels' meaning from classes.json: a set whose two files
        # disagree (one edited, or copied from another set) would train a head of the wrong width, so it is refused.
        if count is not None and names is not None and count != len(names):
            raise ShardError(f"{where}: num_classes is {count!r}, but {names_where} lists {len(names)} classes; the "
                             f"two files are not of the same shard set (one edited, or copied from another); remake "
                             f"the set")
        return cls(settings, plan_id, len(names) if count is None else count, splits, obj.get("converted", []),
                   obj.get("rejected", []), obj.get("ignored", []))


def _check_counts(splits: dict, where: str) -> None:
    """The manifest's numbers are what a loader plans with: each a count (an int >= 0), the shards' samples adding
    up to their split's, names that are shard files, hashes that are sha256 digests."""
    def bad(what: str, value) -> ShardError:
        return ShardError(f"{where}: {what} is {value!r}; not a manifest written by tools/make_shards.py (remake it)")

    for name, split in splits.items():
        for field_name in ("num_samples", "bytes", "num_files", "num_rejected", "num_ignored"):
            value = getattr(split, field_name)
            if type(value) is not int or value < 0:
                raise bad(f"splits.{name}.{field_name}", value)
        for sh in split.shards:
            for field_name in ("num_samples", "bytes"):
                value = getattr(sh, field_name)
                if type(value) is not int or value < 0:
                    raise bad(f"{sh.name}: {field_name}", value)
            if not (isinstance(sh.name, str) and is_shard_file(sh.name) and isinstance(sh.index, str)
                    and is_shard_file(sh.index)):
                raise bad(f"the shard file names of splits.{name}", (sh.name, sh.index))
            if not (isinstance(sh.sha256, str) and _SHA256.fullmatch(sh.sha256)):
                raise bad(f"{sh.name}: sha256", sh.sha256)
        if sum(sh.num_samples for sh in split.shards) != split.num_samples:
            raise bad(f"splits.{name}.num_samples (its shards hold {sum(sh.num_samples for sh in split.shards)})",
                      split.num_samples)


@dataclass(frozen=True)
class ShardSet:
    """A shard set opened once per process start (its manifest and class list read once: on s3:// each read is a
    GET), then handed to whatever needs them: the loaders, the class count, a checkpoint's record of the data."""

    path: str
    manifest: Manifest
    classes: list[str] | None  # classes.json's names; None for an older set without the file

    def fingerprint(self, split: str) -> str | None:
        """A digest of the split's shards' sha256s (the manifest's): equal for the same shards in the same order."""
        entry = self.manifest.splits.get(split)
        if entry is None:
            return None
        return hashlib.sha256(" ".join(s.sha256 for s in entry.shards).encode()).hexdigest()[:16]


def open_shard_set(data_path: str | Path) -> ShardSet:
    """The set at `data_path`, its manifest and class list each read once (ShardError for one that is not a set)."""
    path = storage.join(data_path, MANIFEST)
    try:
        obj = json.loads(storage.read_bytes(path))
    except FileNotFoundError:  # a folder or an S3 prefix alike
        raise ShardError(f"{path}: no shard manifest here; make shards with tools/make_shards.py first") from None
    except (OSError, ValueError) as e:
        raise ShardError(f"{path}: unreadable manifest ({e})") from e
    if not isinstance(obj, dict):
        raise ShardError(f"{path}: not a manifest written by tools/make_shards.py")
    names = read_classes(data_path, missing_ok=True)
    return ShardSet(str(data_path), Manifest.from_json(obj, str(path), names, storage.join(data_path, CLASSES)),
                    names)


def read_manifest(data_path: str | Path) -> Manifest:
    return open_shard_set(data_path).manifest


def read_classes(data_path: str | Path, missing_ok: bool = False) -> list[str] | None:
    """classes.json's class names; None where there is no such file and `missing_ok`."""
    path = storage.join(data_path, CLASSES)
    try:
        names = json.loads(storage.read_bytes(path))
    except FileNotFoundError as e:  # a folder or an S3 prefix alike
        if missing_ok:
            return None
        raise ShardError(f"{path}: unreadable class list ({e})") from e
    except (OSError, ValueError) as e:
        raise ShardError(f"{path}: unreadable class list ({e})") from e
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise ShardError(f"{path}: not a list of class names; not a class list written by tools/make_shards.py "
                         f"(remake the set)")
    return names


def num_classes(data_path: str | Path) -> int:
    return read_manifest(data_path).num_classes


def write_set_files(folder: Path, manifest: Manifest, classes: list[str]) -> None:
    """classes.json, timm's _info.json, then manifest.json (last: its presence means the set is complete)."""
    info = {"name": folder.name, "splits": {TIMM_SPLIT_NAMES[n]: {
        "name": TIMM_SPLIT_NAMES[n], "num_samples": s.num_samples, "filenames": [sh.name for sh in s.shards],
        "shard_lengths": [sh.num_samples for sh in s.shards]} for n, s in manifest.splits.items()}}
    atomicio.write_json(folder / CLASSES, classes)
    atomicio.write_json(folder / TIMM_INFO, info)
    atomicio.write_json(folder / MANIFEST, manifest.to_json())


def shard_list(data_path: str | Path, split: str, manifest: Manifest | None = None,
               known_problems: dict[str, str] | None = None) -> list[Shard]:
    """The split's shards in manifest order, checked to exist so a missing file fails here and not in a worker, and
    to have the manifest's size: a shard replaced (by one of another set, say) or cut short gets a `problem`, which
    the loader raises before training on it (or reports per sample, under on_error="skip"). `known_problems`: by
    shard file name, what a check of their contents found (pipeline/shards/contents.py)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    manifest = manifest or read_manifest(data_path)
    entry = manifest.splits.get(split)
    if not entry or not entry.shards:
        raise ShardError(f"{storage.join(data_path, MANIFEST)}: no '{split}' shards in this data set")
    present, shards = storage.file_sizes(data_path), []  # one listing, not a request per file
    for s in entry.shards:
        for name in (s.name, s.index):
            if name not in present:
                raise ShardError(f"{storage.join(data_path, name)}: listed in the manifest but missing; rerun "
                                 f"tools/make_shards.py to complete it")
        path = storage.join(data_path, s.name)
        problem = None if present[s.name] == s.bytes else (
            f"{present[s.name]} bytes, the manifest says {s.bytes}: not the shard this set was made with (replaced "
            f"or cut short); restore it or remake the set")
        problem = problem or (known_problems or {}).get(s.name)
        shards.append(Shard(path, storage.join(data_path, s.index), s.num_samples, s.bytes, problem))
    return shards
