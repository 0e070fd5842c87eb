"""The shard writer that `tools/make_shards.py` drives: check or convert each image, write tar shards with their
`.idx` and resume records, then the set's files (`pipeline/shards/format.py` owns their names and layouts).

`write_shards` runs in the parent: it scans the source and plans (`pipeline/shards/source.py`), skips shards an earlier
run of the same plan finished, and farms the rest out to worker processes running `build_shards`. Everything a worker
does is a pure function of its job, so a shard's bytes depend only on the source and the settings.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
import warnings
from contextlib import ExitStack, closing
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from pipeline.shards import atomicio, folderlock, jpeg, storage
from pipeline.shards.errors import ShardError, UsageError
from pipeline.shards.format import (CLASSES, FORMAT, FORMATS, IMAGE, LABEL, LOCK_FILE, MANIFEST, PARTS_DIR, PLAN_FILE,
                                    TIMM_INFO, Manifest, Settings, ShardInfo, SplitInfo, encode_label, index_line,
                                    index_text, is_shard_file, member_name, plan_fields, settings_from, shard_name,
                                    write_set_files)
from pipeline.shards.detect import DESCRIPTIONS, detect, scan_source
from pipeline.shards.source import Scan, SplitScan, plan_shards, windows, worker_pool

# Fixed tar header fields: the same input gives byte-identical shards on any machine, any day (re-encoded images:
# with the same libjpeg).
TAR_MTIME = 0
TAR_MODE = 0o444
OUTPUT_FILES = (MANIFEST, PLAN_FILE, CLASSES, TIMM_INFO, LOCK_FILE)


class Rejected(Exception):
    """A source file that cannot become a sample; the message is the reason recorded in the manifest."""


class ShardWriteError(Exception):
    """Writing a shard failed (e.g. disk full); the whole run stops."""


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


def prepare_image(data: bytes, max_side, quality: int, check: str, restart_markers: bool = False) -> tuple:
    """(bytes to store, conversion reason or None); raises Rejected for what Pillow cannot decode.

    RGB JPEGs keep their pixels unless `max_side` asks for a resize: their bytes are stored untouched, or with
    `restart_markers` re-encoded losslessly (`jpeg.recode`: the same DCT coefficients, a restart marker after every
    MCU). Anything else that decodes (CMYK or grayscale JPEG, PNG under a .JPEG name, ...) becomes an RGB JPEG,
    exactly the pixels an ImageFolder loader's `.convert("RGB")` would have produced (with `restart_markers`, then
    recoded too).
    """
    stored, reason = _prepare_image(data, max_side, quality, check, recode_checks=restart_markers)
    if not restart_markers:
        return stored, reason
    try:
        return jpeg.recode(stored), reason  # its entropy decode of every block also checks the whole stream
    except ValueError as e:
        raise Rejected(_decode_error("JPEG", e)) from None


def _prepare_image(data: bytes, max_side, quality: int, check: str, recode_checks: bool) -> tuple:
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
        if keep and recode_checks:
            return data, None  # the caller's recode entropy-decodes every block: that is the check
        if keep and check == "header":
            if not _has_jpeg_end(data):
                raise Rejected(f"truncated {fmt}: no end-of-image marker")
            return data, None
        new_size = (w, h)
        if keep:
            # Kept bytes need no pixels, only proof that the whole stream decodes: at 1/8 DCT scale libjpeg still
            # entropy-decodes every block (where truncation and corruption show) but skips most of the IDCT and
            # colour work.
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


class _ShardTar:
    """One shard being written: its tar, hashed and counted as it is written, and its record."""

    def __init__(self, tmp: Path):
        self.raw = open(tmp, "wb")
        self.out = _HashingWriter(self.raw)
        # Plain tarfile rather than webdataset's ShardWriter: we need fixed header fields for
        # byte-identical reruns, temp-name + rename atomicity, and each member's data offset.
        # copybufsize: one write per member instead of 16 KiB pieces.
        self.tar = tarfile.open(fileobj=self.out, mode="w", format=tarfile.USTAR_FORMAT, copybufsize=1 << 24)
        self.rec = {"num_samples": 0, "read_bytes": 0, "converted": [], "rejected": [], "index": []}

    def add(self, key: str, label: int, jpg: bytes) -> None:
        cls = encode_label(label)
        jpg_at = _add_member(self.tar, member_name(key, IMAGE), jpg)
        cls_at = _add_member(self.tar, member_name(key, LABEL), cls)
        self.rec["index"].append(index_line(key, [(IMAGE, jpg_at, len(jpg)), (LABEL, cls_at, len(cls))]))
        self.rec["num_samples"] += 1

    def finish(self) -> dict:
        self.tar.close()
        self.raw.flush()
        os.fsync(self.raw.fileno())
        self.raw.close()
        self.rec["bytes"], self.rec["sha256"] = self.out.pos, self.out.sha.hexdigest()
        return self.rec

    def close(self) -> None:
        self.raw.close()


def read_order(shards: list) -> list:
    """(shard position, entry) in the order the source is read: one shard's planned order, or, for a window of
    shards (each planned in reading order), all of them merged by location."""
    tagged = [(i, e) for i, entries in enumerate(shards) for e in entries]
    return tagged if len(shards) == 1 else sorted(tagged, key=lambda t: t[1].loc)


def _write_tars(tmps: list, shards: list, reader, split: str, settings: Settings) -> list:
    """Write the samples of the shards (lists of entries) to `tmps`; returns their records (without file names)."""
    order = read_order(shards)
    shard_of = {e.key: i for i, e in order}  # keys are unique in a split
    with ExitStack() as stack:  # every tar and the reader's open files closed, whatever ends the job
        writers = []
        for tmp in tmps:
            writers.append(_ShardTar(tmp))
            stack.callback(writers[-1].close)
        for entry, data in stack.enter_context(closing(reader.read_all([e for _, e in order]))):
            i = shard_of[entry.key]
            rec = writers[i].rec
            try:
                if isinstance(data, str):
                    raise Rejected(data)
                rec["read_bytes"] += len(data)
                jpg, reason = prepare_image(data, settings.max_side, settings.quality, settings.check,
                                            settings.restart_markers)
            except Rejected as e:
                rec["rejected"].append({"split": split, "path": entry.path, "reason": str(e)})
                continue
            if reason:
                rec["converted"].append({"split": split, "path": entry.path, "key": entry.key, "reason": reason})
            writers[i].add(entry.key, entry.label, jpg)
        return [w.finish() for w in writers]


@dataclasses.dataclass(frozen=True)
class ShardJob:
    """Shards to build in one pass over their source: what a pool worker gets (picklable)."""

    split: str
    shards: tuple  # (number in its split, its planned entries) of each shard
    reader: object  # the source's reader (pipeline/shards/source.py)
    dst: Path  # the output folder, or the staging folder of a remote set
    settings: Settings
    plan_id: str
    remote: str | None  # the s3:// prefix the shards are uploaded to, if any


def build_shards(job: ShardJob) -> list:
    """Worker entry point: per shard, write `<name>.tar`, `<name>.idx`, then the `.parts/<name>.json` record.

    The record is written last and atomically, so its presence (with matching plan id and sizes) proves the shard is
    complete. With `remote` (an s3:// prefix), `dst` is a staging folder: the shards and their indexes are uploaded,
    then the records, and the local copies removed, so staging holds at most one job's shards per worker.
    """
    split, dst, remote = job.split, job.dst, job.remote
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    names = [shard_name(split, number) for number, _ in job.shards]
    tmps = [atomicio.temp_path(dst / f"{name}.tar") for name in names]
    current = names[0]
    try:
        # fsync'd: the shards are the costly part
        recs = _write_tars(tmps, [entries for _, entries in job.shards], job.reader, split, job.settings)
        for name, tmp, rec in zip(names, tmps, recs):
            current = name
            tar_path, idx_path = dst / f"{name}.tar", dst / f"{name}.idx"
            index = index_text(rec.pop("index")).encode()
            # The index's bytes are on disk before its name (as the tar's, fsync'd by finish()); the record is not
            # fsync'd: one lost to a power cut only makes the next run rebuild this shard.
            atomicio.write_bytes(idx_path, index)
            atomicio.finish_temp(tmp, tar_path, fsync=False)
            atomicio.fsync_dir(dst)  # both renames are durable before the record says "done"
            rec.update({"plan_id": job.plan_id, "split": split, "name": f"{name}.tar", "index": f"{name}.idx",
                        "index_bytes": len(index)})
            if remote:
                storage.upload(tar_path, storage.join(remote, tar_path.name))
                storage.upload(idx_path, storage.join(remote, idx_path.name))
                storage.put_bytes(storage.join(remote, f"{PARTS_DIR}/{name}.json"), json.dumps(rec).encode())
                tar_path.unlink()
                idx_path.unlink()
            else:
                atomicio.write_json(dst / PARTS_DIR / f"{name}.json", rec, fsync=False)
    except OSError as e:
        raise ShardWriteError(f"writing {current}: {e.strerror or e} ({e.filename or dst})") from None
    except ShardError as e:  # an upload that failed after botocore's retries
        raise ShardWriteError(f"uploading {current}: {e}") from None
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
    return recs


# -- the whole set: plan, resume, build, set files --------------------------------------------------------------------

def resolve_settings(given: dict, src: Path, previous: dict) -> Settings:
    """Values given (None = not given) > the plan already in DST (so a plain rerun resumes, in the format it was
    begun in) > Settings' defaults."""
    was = settings_from(previous, PLAN_FILE) if previous else Settings()
    kw = {}
    for f in dataclasses.fields(Settings):
        if f.name != "source":
            kw[f.name] = given[f.name] if given.get(f.name) is not None else getattr(was, f.name)
    if given.get("restart_markers") is None and not previous:  # a new set: on where the region decoder is built
        kw["restart_markers"] = jpeg.decoder_available("region")
        if not kw["restart_markers"]:  # the same command gives other bytes where it is built: say so
            print("make_shards: the region decoder (pipeline.shards._jpegregion) is not built, so this set gets no "
                  "restart markers; `bash tools/setup.sh` builds it where libjpeg's headers are", file=sys.stderr)
    settings = Settings(**kw, source=str(src))
    if settings.restart_markers and not jpeg.decoder_available("region"):
        raise UsageError("--restart-markers needs the region decoder (pipeline.shards._jpegregion), which is not "
                         "built: install libjpeg-turbo's headers (libjpeg62-turbo-dev) and rerun `pip install -e .`")
    if settings.samples_per_shard < 1:
        raise UsageError("--samples-per-shard must be >= 1")
    if settings.max_side is not None and settings.max_side < 16:
        raise UsageError("--max-side must be >= 16")
    if not 1 <= settings.quality <= 100:
        raise UsageError("--quality must be between 1 and 100")
    return settings


def make_plan_id(settings: Settings, scan: Scan) -> str:
    # A window is part of the plan (plan_shards: another one puts samples in other shards); without one, the ids
    # are those of sets made before windows, which still resume.
    window = f"\0window={scan.window}" if scan.window != 1 else ""
    blob = json.dumps(plan_fields(settings), sort_keys=True) + scan.fingerprint + window
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Destination:
    """Where the set goes: a local folder, or an S3 prefix written through a local staging folder (shards are built
    there, uploaded, and removed; the set's files are uploaded last, manifest.json at the very end)."""

    def __init__(self, out: str | Path, staging: str | Path | None = None):
        self.remote = str(out).rstrip("/") if storage.is_s3(out) else None
        if self.remote:
            self.local = Path(staging) if staging else Path(tempfile.mkdtemp(prefix="make_shards_staging_"))
        else:
            self.local = Path(os.path.abspath(out))

    def __str__(self) -> str:
        return self.remote or str(self.local)

    def read_json(self, name: str):
        try:
            return json.loads(storage.read_bytes(storage.join(self.remote or self.local, name)))
        except (OSError, ValueError):  # not there (FileNotFoundError, from a folder or S3) or not JSON
            return None  # wrong credentials or no server are ShardErrors: they propagate

    def listing(self) -> dict[str, int]:
        """Name -> size of what is there, `.parts/<name>.json` records included."""
        if self.remote:
            return storage.sizes(self.remote)
        found = {}
        for folder, prefix in ((self.local, ""), (self.local / PARTS_DIR, f"{PARTS_DIR}/")):
            if folder.is_dir():  # sub-folders count as something there (size -1), files with their size
                found.update({prefix + e.name: e.stat().st_size if e.is_file() else -1 for e in os.scandir(folder)
                              if e.name != PARTS_DIR})
        return found

    def remove(self, names: list[str]) -> None:
        if self.remote:
            storage.delete(self.remote, names)
        else:
            for name in names:
                (self.local / name).unlink(missing_ok=True)

    def publish(self, names: list[str]) -> None:
        """Upload files finished in staging, in this order (a remote set only)."""
        for name in names if self.remote else ():
            storage.upload(self.local / name, storage.join(self.remote, name))


def lock_folder(folder: Path, name: str) -> int:
    """An exclusive lock on `folder` for this run (a descriptor; closing it releases the lock, folderlock.py). A
    second writer is refused in one line naming the first: two writers would delete each other's temporary files and
    could leave shards that disagree with the manifest."""
    try:
        fd, _ = folderlock.take(folder / LOCK_FILE)  # the line a finished run left there says nothing: replaced
    except folderlock.Held as e:
        raise UsageError(f"{name} is being written by another make_shards ({e.holder or 'another process'}); wait for "
                         f"it to finish or stop it") from None
    return fd


def ours(name: str) -> bool:
    """Files this writer puts into DST (what --overwrite may delete, and what 'DST is empty' ignores)."""
    top = name.split("/", 1)[0]
    return top in OUTPUT_FILES or top == PARTS_DIR or atomicio.is_temp_name(top) or is_shard_file(top)


def prepare_out(dest: Destination, settings: Settings, plan_id: str, overwrite: bool) -> dict[str, int]:
    """Make sure DST is empty, or a (partial) run of this very plan, or may be overwritten. Returns what is there."""
    dest.local.mkdir(parents=True, exist_ok=True)
    atomicio.remove_temp_files(dest.local)
    atomicio.remove_temp_files(dest.local / PARTS_DIR)
    present = dest.listing()
    old = dest.read_json(PLAN_FILE) or dest.read_json(MANIFEST) or {}
    if old.get("plan_id") == plan_id or not [n for n in present if not n.startswith(PARTS_DIR + "/")
                                             and n != LOCK_FILE]:
        return present
    if not overwrite:
        if old:
            try:
                was = dataclasses.asdict(settings_from(old, str(dest)))
            except ShardError as e:  # a set this version cannot read: only --overwrite can replace it
                raise UsageError(f"{e}; pass --overwrite to replace it or pick another --out") from None
            # The format is not the user's setting: an old set that cannot resume is rewritten in today's format.
            diff = [f"{k}: {was.get(k)!r} -> {v!r}" for k, v in dataclasses.asdict(settings).items()
                    if was.get(k) != v and k != "format"]
            why = ", ".join(diff) if diff else "the source files changed (names, sizes or times)"
            raise UsageError(f"{dest} holds shards of another data set or settings ({why}); "
                             "pass --overwrite to replace them or pick another --out")
        raise UsageError(f"{dest} is not empty and holds no make_shards output; pick another --out")
    dest.remove([n for n in present if ours(n) and n != LOCK_FILE])  # the lock: ours, and held right now
    return {}


def finished_record(dest: Destination, present: dict[str, int], name: str, plan_id: str):
    """The record of a shard finished by an earlier run of this plan, or None if it must be (re)built."""
    rec = dest.read_json(f"{PARTS_DIR}/{name}.json") if f"{PARTS_DIR}/{name}.json" in present else None
    if not rec or rec.get("plan_id") != plan_id:
        return None
    # Sizes, not hashes: re-hashing every finished shard would cost as much as a --verify.
    if present.get(rec["name"]) != rec["bytes"] or present.get(rec["index"]) != rec.get("index_bytes"):
        return None
    return rec


def run_jobs(jobs: list, workers: int):
    """Yield each job's records as it finishes (any order); in-process when workers == 1."""
    if workers == 1 or len(jobs) <= 1:
        yield from map(build_shards, jobs)
        return
    with worker_pool(min(workers, len(jobs))) as pool:
        yield from pool.imap_unordered(build_shards, jobs)


def build(dest: Destination, present: dict[str, int], scan: Scan, settings: Settings, plan_id: str,
          workers: int) -> dict:
    """Build every shard not already finished; returns {shard name: record}."""
    records, jobs, shards_to_build = {}, [], 0
    for split in scan.splits.values():
        plan = plan_shards(split, settings.seed, settings.samples_per_shard, scan.window)
        for numbers in windows(len(plan), scan.window):
            todo = []
            for i in numbers:
                rec = finished_record(dest, present, shard_name(split.name, i), plan_id)
                if rec:
                    records[shard_name(split.name, i)] = rec
                else:
                    todo.append((i, plan[i]))
            if todo:
                jobs.append(ShardJob(split.name, tuple(todo), scan.reader, dest.local, settings, plan_id,
                                     dest.remote))
                shards_to_build += len(todo)
    if records:
        print(f"resuming: {len(records)} shards already built, {shards_to_build} to build")
    total = sum(len(entries) for j in jobs for _, entries in j.shards)
    start, read = time.perf_counter(), 0
    bar = tqdm(total=total, unit="img", desc="shards", dynamic_ncols=True, disable=not jobs)
    # closing(): on an error or Ctrl-C the pool is torn down here, before temp files are cleaned.
    with bar, closing(run_jobs(jobs, workers)) as results:
        for recs in results:
            for rec in recs:
                records[rec["name"].removesuffix(".tar")] = rec
                read += rec["read_bytes"]
                bar.update(rec["num_samples"] + len(rec["rejected"]))
            bar.set_postfix_str(f"{read / 1e6 / max(1e-9, time.perf_counter() - start):.1f} MB/s")
    return records


def split_info(split: SplitScan, recs: list) -> tuple[SplitInfo, list]:
    """A split's manifest entry, and its rejected files (scan-time and decode-time) sorted by path."""
    rejected = sorted(split.rejected + [r for rec in recs for r in rec["rejected"]], key=lambda r: r["path"])
    shards = [ShardInfo(**{k: rec[k] for k in ("name", "index", "num_samples", "bytes", "sha256")}) for rec in recs]
    info = SplitInfo(num_samples=sum(r["num_samples"] for r in recs), bytes=sum(r["bytes"] for r in recs),
                     num_files=split.num_files, num_rejected=len(rejected), num_ignored=len(split.ignored),
                     shards=shards)
    return info, rejected


def write_outputs(dest: Destination, scan: Scan, settings: Settings, plan_id: str, records: dict) -> Manifest:
    splits, converted, rejected, ignored = {}, [], [], []
    for name, split in scan.splits.items():
        recs = [records[k] for k in sorted(records) if k.startswith(name + "-")]
        splits[name], split_rejected = split_info(split, recs)
        rejected += split_rejected
        converted += sorted((c for r in recs for c in r["converted"]), key=lambda c: c["path"])
        ignored += split.ignored
    manifest = Manifest(settings, plan_id, len(scan.classes), splits, converted, rejected, ignored)
    write_set_files(dest.local, manifest, scan.classes)
    dest.publish([CLASSES, TIMM_INFO, MANIFEST])  # the manifest last: a reader never sees a half-written set
    return manifest


def write_shards(src: Path, out: str | Path, given: dict, workers: int = 1, overwrite: bool = False,
                 staging: str | Path | None = None) -> tuple[Manifest, Scan]:
    """Source `src` (pipeline/shards/detect.py) -> shard set `out` (a folder or an s3:// prefix, built through
    `staging`), resuming an
    interrupted run of the same plan. `given`: the Settings values asked for (None = keep what the plan in `out`
    says, else the default). Returns the manifest and the scan (for a verify). UsageError for input the user must
    fix, ShardWriteError when writing fails, ShardError when S3 cannot be used."""
    src = Path(os.path.abspath(src))
    if workers < 1:
        raise UsageError("--workers must be >= 1")
    if not src.is_dir():
        raise UsageError(f"--data_path {src} is not a folder")
    refuse_nesting(src, out, staging)
    kind = detect(src)
    print(f"make_shards: {src} is {DESCRIPTIONS[kind]}", flush=True)
    if not storage.is_s3(out) and Path(out).exists() and not Path(out).is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    dest, lock = Destination(out, staging), None
    try:  # from here a staging folder of our own exists: the finally below removes it, whatever ends the run
        previous = dest.read_json(PLAN_FILE) or {}
        # A plan of this source in a format this version reads is what a rerun resumes; any other plan is a set that
        # prepare_out refuses (or, with --overwrite, replaces).
        resumable = previous.get("source") == str(src) and previous.get("format") in FORMATS
        settings = resolve_settings(given, src, previous if resumable else {})
        scan = scan_source(src, kind, workers)
        if not any(s.num_files for s in scan.splits.values()):
            raise UsageError(f"--data_path {src} holds no train or val files")
        plan_id = make_plan_id(settings, scan)
        if settings.format != FORMAT and plan_id != previous.get("plan_id"):  # not a resume: today's format
            settings = dataclasses.replace(settings, format=FORMAT)
            plan_id = make_plan_id(settings, scan)
        dest.local.mkdir(parents=True, exist_ok=True)
        lock = lock_folder(dest.local, str(dest))
        present = prepare_out(dest, settings, plan_id, overwrite)
        (dest.local / PARTS_DIR).mkdir(exist_ok=True)
        atomicio.write_json(dest.local / PLAN_FILE, {**dataclasses.asdict(settings), "plan_id": plan_id,
                                                    "fingerprint": scan.fingerprint})
        dest.publish([PLAN_FILE])
        records = build(dest, present, scan, settings, plan_id, workers)
        return write_outputs(dest, scan, settings, plan_id, records), scan
    finally:
        if dest.remote and staging is None:
            shutil.rmtree(dest.local, ignore_errors=True)  # a staging folder of our own: nothing in it is needed
        if lock is not None:
            # Only the holder of the lock may clean: a run refused by it would delete the live temporary files of the
            # run that holds it. Workers are gone by now (build() leaves the pool before an error gets here).
            if not dest.remote:
                remove_leftovers(dest.local)
            os.close(lock)  # releases the lock (the kernel does so too when the process dies, however it dies)


def refuse_nesting(src: Path, out: str | Path, staging: str | Path | None) -> None:
    """A UsageError, before anything is written, when the local folder this run writes (--out, or the --staging of
    an s3:// --out) is --data_path, lies inside it, or holds it, symlinks resolved. Shards inside the source are read
    back as source by the next run (a phantom class named after the folder, or 'the source files changed'); a
    source inside the output is among what --overwrite may delete."""
    flag, folder = ("--staging", staging) if storage.is_s3(out) else ("--out", out)
    if folder is None:
        return  # an object store and a staging folder of our own (a fresh temporary folder) lie outside any source
    source, written = Path(os.path.realpath(src)), Path(os.path.realpath(folder))

    def shown(path, real: Path) -> str:  # the path as given, and where it leads when a symlink takes it elsewhere
        return str(path) if os.path.abspath(path) == str(real) else f"{path} (= {real})"

    if written == source or source in written.parents:
        raise UsageError(f"{flag} {shown(folder, written)} is inside --data_path {shown(src, source)}: a rerun would "
                         f"read the shards as source files; pick an {flag} outside it")
    if written in source.parents:
        raise UsageError(f"--data_path {shown(src, source)} is inside {flag} {shown(folder, written)}; pick an {flag} "
                         f"that does not hold the source")


def remove_leftovers(dst: Path) -> None:
    """Temporary files of workers that were stopped mid-write (finished files are never touched)."""
    for folder in (Path(dst), Path(dst) / PARTS_DIR):
        try:
            atomicio.remove_temp_files(folder)
        except OSError:
            pass
