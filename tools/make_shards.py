"""Pack an ImageFolder (`SRC/train/<class>/*`, `SRC/val/<class>/*`) into webdataset tar shards.

    python tools/make_shards.py --data_path SRC --out DST [--samples-per-shard 1000] [--workers 8]

Writes `DST/{train,val}-NNNNNN.tar` (+ a DALI `.idx` beside each), `DST/classes.json`, timm's
`DST/_info.json` and `DST/manifest.json`. Every file appears under its final name only when complete;
a rerun resumes an interrupted run and gives byte-identical output. See docs/data.md.

Exit status: 0 all files packed; 3 done, but some files were rejected (listed in the manifest);
2 usage error (bad arguments, missing/empty SRC, DST holds other shards); 4 --verify found a mismatch;
1 other failure (e.g. disk full); 130 interrupted.
"""
import argparse
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
import re
from collections import Counter
from contextlib import closing
from pathlib import Path

from tqdm import tqdm

if __package__ in (None, ""):
    # Run as `python tools/make_shards.py`: make the `tools` package importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools import atomicio, shard_verify, shardlib  # noqa: E402
from tools.shardlib import PARTS_DIR, ShardWriteError, UsageError  # noqa: E402

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REJECTED, EXIT_VERIFY, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
PLAN_FILE = ".plan.json"
OUTPUT_FILES = ("manifest.json", "_info.json", "classes.json", PLAN_FILE)
# Settings that change shard bytes; unset flags are taken from an existing plan in DST, then from here.
DEFAULTS = {
    "seed": 0,  # shuffle seed
    "samples_per_shard": 1000,  # ~110 MB shards for ImageNet
    "max_side": None,  # re-encode images whose longer side exceeds this (px); None keeps originals
    "quality": 95,  # JPEG quality for re-encoded images (conversions, resizes)
    "check": "decode",  # decode: Pillow decodes every image; header: header + end-marker check only
}


def folder_arg(text: str) -> Path:
    # Path("") would quietly become the current folder.
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return Path(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_path", type=folder_arg, required=True, help="ImageFolder root holding train/ and/or val/")
    p.add_argument("--out", type=folder_arg, required=True, help="output folder for shards")
    p.add_argument("--samples-per-shard", type=int, help=f"default {DEFAULTS['samples_per_shard']}")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes; 1 = in-process")
    p.add_argument("--max-side", type=int, help="re-encode images longer than this (px); default: keep")
    p.add_argument("--quality", type=int, help=f"JPEG quality of re-encoded images, default {DEFAULTS['quality']}")
    p.add_argument("--seed", type=int, help=f"shuffle seed, default {DEFAULTS['seed']}")
    p.add_argument("--check", choices=("decode", "header"),
                   help="decode (default): Pillow fully decodes each image; header: faster, only catches "
                        "unreadable headers and cut-off JPEGs")
    p.add_argument("--verify", action="store_true", help="re-read all shards and check them against SRC")
    p.add_argument("--overwrite", action="store_true", help="replace shards of another data set/settings in DST")
    return p


def resolve_settings(args, src: Path, previous: dict) -> dict:
    """Flags given > the plan already in DST (so a plain rerun resumes) > DEFAULTS."""
    s = {"format": shardlib.FORMAT}
    for k, default in DEFAULTS.items():
        given = getattr(args, k)
        s[k] = given if given is not None else previous.get(k, default)
    s["source"] = str(src)
    if s["samples_per_shard"] < 1 or args.workers < 1:
        raise UsageError("--samples-per-shard and --workers must be >= 1")
    if s["max_side"] is not None and s["max_side"] < 16:
        raise UsageError("--max-side must be >= 16")
    if not 1 <= s["quality"] <= 100:
        raise UsageError("--quality must be between 1 and 100")
    return s


def plan_id(settings: dict, fingerprint: str) -> str:
    blob = json.dumps(settings, sort_keys=True) + fingerprint
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def ours(name: str) -> bool:
    """Files this tool writes into DST (used by --overwrite and the 'is DST empty' check)."""
    stem, _, ext = name.partition(".")
    split, _, num = stem.partition("-")
    return name in OUTPUT_FILES or name == PARTS_DIR or atomicio.is_temp_name(name) or (
        split in shardlib.SPLITS and len(num) == 6 and num.isdigit() and ext in ("tar", "idx"))


def prepare_out(dst: Path, settings: dict, pid: str, overwrite: bool) -> None:
    """Make sure DST is empty, or a (partial) run of this very plan, or may be overwritten."""
    dst.mkdir(parents=True, exist_ok=True)
    atomicio.remove_temp_files(dst)
    atomicio.remove_temp_files(dst / PARTS_DIR)
    old = read_json(dst / PLAN_FILE) or read_json(dst / "manifest.json") or {}
    present = [n for n in os.listdir(dst) if n != PARTS_DIR]
    if old.get("plan_id") == pid or not present:
        return
    if not overwrite:
        if old:
            diff = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v]
            why = ", ".join(diff) if diff else "the source files changed (names, sizes or times)"
            raise UsageError(f"{dst} holds shards of another data set or settings ({why}); "
                             "pass --overwrite to replace them or pick another --out")
        raise UsageError(f"{dst} is not empty and holds no make_shards output; pick another --out")
    for name in os.listdir(dst):
        if ours(name):
            path = dst / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def finished_record(dst: Path, name: str, pid: str):
    """The record of a shard finished by an earlier run of this plan, or None if it must be (re)built."""
    rec = read_json(dst / PARTS_DIR / f"{name}.json")
    if not rec or rec.get("plan_id") != pid:
        return None
    tar, idx = dst / rec["name"], dst / rec["index"]
    # Sizes, not hashes: re-hashing every finished shard would cost as much as a --verify.
    if not (tar.is_file() and idx.is_file() and tar.stat().st_size == rec["bytes"]
            and idx.stat().st_size == rec.get("index_bytes")):
        return None
    return rec


def _ignore_sigint():
    # Ctrl-C reaches the whole process group; the parent alone handles it and ends the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_jobs(jobs: list, workers: int):
    """Yield each shard's record as it finishes (any order); in-process when workers == 1."""
    if workers == 1 or len(jobs) <= 1:
        yield from map(shardlib.build_shard, jobs)
        return
    with multiprocessing.Pool(min(workers, len(jobs)), initializer=_ignore_sigint) as pool:
        yield from pool.imap_unordered(shardlib.build_shard, jobs)


def build(src: Path, dst: Path, scan: shardlib.Scan, settings: dict, pid: str, workers: int) -> dict:
    """Build every shard not already finished; returns {shard name: record}."""
    records, jobs = {}, []
    for split in scan.splits.values():
        for i, entries in enumerate(shardlib.plan_shards(split, settings["seed"], settings["samples_per_shard"])):
            name = shardlib.shard_name(split.name, i)
            rec = finished_record(dst, name, pid)
            if rec:
                records[name] = rec
            else:
                jobs.append((split.name, i, entries, src, dst, settings, pid))
    if records:
        print(f"resuming: {len(records)} shards already built, {len(jobs)} to build")
    total = sum(len(j[2]) for j in jobs)
    start, read = time.perf_counter(), 0
    bar = tqdm(total=total, unit="img", desc="shards", dynamic_ncols=True, disable=not jobs)
    # closing(): on an error or Ctrl-C the pool is torn down here, before temp files are cleaned.
    with bar, closing(run_jobs(jobs, workers)) as results:
        for rec in results:
            records[rec["name"].removesuffix(".tar")] = rec
            read += rec["read_bytes"]
            bar.update(rec["num_samples"] + len(rec["rejected"]))
            bar.set_postfix_str(f"{read / 1e6 / max(1e-9, time.perf_counter() - start):.1f} MB/s")
    return records


def split_summary(split: shardlib.SplitScan, recs: list) -> dict:
    rejected = split.rejected + [r for rec in recs for r in rec["rejected"]]
    shards = [{k: rec[k] for k in ("name", "index", "num_samples", "bytes", "sha256")} for rec in recs]
    return {"num_samples": sum(r["num_samples"] for r in recs), "bytes": sum(r["bytes"] for r in recs),
            "num_files": split.num_files, "num_rejected": len(rejected), "num_ignored": len(split.ignored),
            "shards": shards, "_rejected": sorted(rejected, key=lambda r: r["path"])}


def write_outputs(dst: Path, scan: shardlib.Scan, settings: dict, pid: str, records: dict) -> dict:
    """classes.json, _info.json, then manifest.json (last: its presence means the set is complete)."""
    splits, converted, rejected, ignored = {}, [], [], []
    for name, split in scan.splits.items():
        recs = [records[k] for k in sorted(records) if k.startswith(name + "-")]
        splits[name] = split_summary(split, recs)
        rejected += splits[name].pop("_rejected")
        converted += sorted((c for r in recs for c in r["converted"]), key=lambda c: c["path"])
        ignored += split.ignored
    manifest = {**settings, "plan_id": pid, "num_classes": len(scan.classes), "splits": splits,
                "converted": converted, "rejected": rejected, "ignored": ignored}
    # timm's wds reader calls the held-out split "validation" (its default --val-split).
    timm_names = {"train": "train", "val": "validation"}
    info = {"name": dst.name, "splits": {timm_names[n]: {
        "name": timm_names[n], "num_samples": s["num_samples"],
        "filenames": [sh["name"] for sh in s["shards"]],
        "shard_lengths": [sh["num_samples"] for sh in s["shards"]]} for n, s in splits.items()}}
    atomicio.write_json(dst / "classes.json", scan.classes)
    atomicio.write_json(dst / "_info.json", info)
    atomicio.write_json(dst / "manifest.json", manifest)
    return manifest


def print_summary(manifest: dict, limit: int = 20) -> None:
    for name, s in manifest["splits"].items():
        print(f"{name}: {s['num_files']} files = {s['num_samples']} in {len(s['shards'])} shards"
              f" + {s['num_rejected']} rejected + {s['num_ignored']} ignored")
    if manifest["converted"]:
        kinds = Counter(re.sub(r" \d+x\d+ -> \d+x\d+", "", c["reason"]) for c in manifest["converted"])
        print(f"converted {len(manifest['converted'])}: " + ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items())))
    if manifest["rejected"]:
        print(f"rejected {len(manifest['rejected'])}:")
        for r in manifest["rejected"][:limit]:
            print(f"  {r['path']}: {r['reason']}")
        if len(manifest["rejected"]) > limit:
            print(f"  ... {len(manifest['rejected']) - limit} more, see manifest.json")


def run(args) -> int:
    src, dst = Path(os.path.abspath(args.data_path)), Path(os.path.abspath(args.out))
    if not src.is_dir():
        raise UsageError(f"--data_path {args.data_path} is not a folder")
    if dst.exists() and not dst.is_dir():
        raise UsageError(f"--out {args.out} exists and is not a folder")
    previous = read_json(dst / PLAN_FILE) or {}
    settings = resolve_settings(args, src, previous if previous.get("source") == str(src) else {})
    scan = shardlib.scan_source(src)
    if not any(s.num_files for s in scan.splits.values()):
        raise UsageError(f"--data_path {args.data_path} holds no files under train/ or val/")
    pid = plan_id(settings, scan.fingerprint)
    prepare_out(dst, settings, pid, args.overwrite)
    (dst / PARTS_DIR).mkdir(exist_ok=True)
    atomicio.write_json(dst / PLAN_FILE, {**settings, "plan_id": pid, "fingerprint": scan.fingerprint})
    records = build(src, dst, scan, settings, pid, args.workers)
    manifest = write_outputs(dst, scan, settings, pid, records)
    print_summary(manifest)
    if args.verify:
        problems = shard_verify.verify(src, dst, scan, manifest)
        if problems:
            return EXIT_VERIFY
    return EXIT_REJECTED if manifest["rejected"] else EXIT_OK


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ShardWriteError as e:
        print(f"make_shards: error: {e}; temporary files removed, finished shards kept", file=sys.stderr)
        return EXIT_FAILED
    except OSError as e:
        print(f"make_shards: error: {e.strerror or e}: {e.filename or ''}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("make_shards: interrupted; finished shards are kept, rerun the same command to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        # Workers are gone by now (leaving the pool terminates them); drop what they half wrote.
        for folder in (args.out, args.out / PARTS_DIR):
            try:
                atomicio.remove_temp_files(folder)
            except OSError:
                pass


if __name__ == "__main__":
    sys.exit(main())
