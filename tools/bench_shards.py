"""Benchmark: how close `make_shards.py` (no re-encode) comes to just reading the source files.

    python tools/bench_shards.py --data_path SRC [--workers W] [--repeats 3]

What it measures, on the same machine and files:
  * `cat`: one process opens and reads every file under SRC/train and SRC/val, summing bytes;
    the floor any sharder has to pay for input.
  * `make_shards --no-restart-markers` with `--check decode` (the default) and `--check header`, W workers, no
    `--max-side`, so images are copied, not re-encoded; and `make_shards --restart-markers` (the default where the
    region decoder is built), which re-encodes every JPEG losslessly (its entropy decode is the check). The clock
    covers the whole `main()` call: scan, plan, image checks, tar + index writing with fsync, manifest. Output
    goes to a fresh temporary folder (`--tmp`, default the system's) that is deleted afterwards.
By default all files are read once before timing, so both sides read from the page cache; each figure is
the best of --repeats runs. `--cold` (root only) drops the page cache before every timed run instead, so
`cat` reads from the disk, as a sharder meeting a data set for the first time does: that is the read rate
the >= 0.8 goal is about on a real data set, which never sits in the page cache whole.

`--sources` times instead make_shards from each other form ImageNet comes in, repacked from SRC by
`pipeline/shards/repack.py` (the ILSVRC2012 tars with nested class tars, Hugging Face parquet, webdataset tars),
against make_shards from SRC itself, with the same settings (`--check header --no-restart-markers`, where the reading
and packing show most, and the defaults): `ratio_vs_imagefolder` is its images/s over the ImageFolder's. One extra run
of each, as a subprocess, counts the bytes it read (Linux `rchar`, every read call of it and its workers, minus what
`make_shards -h` reads to start, with the form's lazy imports) against the source's size: `read_vs_cat`, 1.0 = each
byte once.

Output: one JSON line per measurement with images/s and MB/s (source bytes / wall time), and for the
sharder `ratio_vs_cat` = its images/s over cat's. 1.0 means sharding is as fast as reading; the goal
is >= 0.8. `decode` pays a full JPEG decode per image, which a warm-cache `cat` never does, so on few
cores expect it far below the goal; `header` shows the cost of the packing itself.
"""
import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from pipeline.shards.format import SPLITS
from pipeline.shards.jpeg import decoder_available
from pipeline.shards.repack import FORMS
from pipeline.shards.writer import write_shards


def source_files(src: Path) -> list:
    return [p for s in SPLITS if (src / s).is_dir() for p in sorted((src / s).rglob("*")) if p.is_file()]


def cat(files: list) -> int:
    total = 0
    for p in files:
        with open(p, "rb") as f:
            total += len(f.read())
    return total


def copy(files: list, dst: Path, per_file: int) -> None:
    """Concatenate every `per_file` source files into one output file, fsync'd: a sharder minus the sharding."""
    for start in range(0, len(files), per_file):
        with open(dst / f"{start}.bin", "wb") as out:
            for p in files[start:start + per_file]:
                with open(p, "rb") as f:
                    out.write(f.read())
            out.flush()
            os.fsync(out.fileno())


def drop_page_cache() -> None:
    os.sync()  # dirty pages (the last run's shards) are not dropped, so write them out first
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        raise SystemExit(f"bench_shards: --cold needs root on Linux to drop the page cache ({e})") from None


def time_best(fn, repeats: int, tmp_root, cold: bool = False) -> float:
    """Best wall time of fn(scratch folder) over `repeats` runs; the folder is deleted afterwards."""
    best = float("inf")
    for _ in range(repeats):
        scratch = Path(tempfile.mkdtemp(prefix="bench_shards_", dir=tmp_root))
        if cold:
            drop_page_cache()
        try:
            t = time.perf_counter()
            fn(scratch)
            best = min(best, time.perf_counter() - t)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return best


def shard(src: Path, dst: Path, settings: dict, workers: int, per_shard: int) -> None:
    """What `tools/make_shards.py` runs (its writer, without --verify), minus the printing."""
    # The progress bar would be timed too; keep it out of the measurement.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        write_shards(src, dst / "out", {"samples_per_shard": per_shard, **settings}, workers)


def line(name: str, n: int, nbytes: int, seconds: float, **extra) -> dict:
    return {"bench": name, "images": n, "MB": round(nbytes / 1e6, 1), "seconds": round(seconds, 3),
            "images_per_s": round(n / seconds, 1), "MB_per_s": round(nbytes / 1e6 / seconds, 1), **extra}


SOURCE_SETTINGS = {"--check header --no-restart-markers": {"check": "header", "restart_markers": False},
                   "defaults": {}}
LAZY_IMPORTS = {"ilsvrc": "import scipy.io", "parquet": "import pyarrow.parquet"}  # what a form's reading imports
MAKE_SHARDS = Path(__file__).with_name("make_shards.py")


def rchar() -> int:
    """Bytes this process and its reaped children have read through read calls (Linux)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar"))


def bytes_read(cmd: list) -> int:
    before = rchar()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return rchar() - before


def bench_sources(args, tmp_root: Path) -> None:
    """make_shards from each form of SRC against make_shards from SRC (see the docstring)."""
    forms = {"imagefolder": args.data_path}
    for form in FORMS:
        forms[form] = tmp_root / form
        FORMS[form](args.data_path, forms[form])
    n = len(source_files(args.data_path))
    # What the interpreter reads to start make_shards (`-h`: every module it imports) and the form's lazy imports.
    startup = {form: bytes_read([sys.executable, "-c", f"{LAZY_IMPORTS.get(form, 'pass')}; import runpy, sys; "
                                 f"sys.argv = ['make_shards', '-h']; runpy.run_path({str(MAKE_SHARDS)!r}, "
                                 f"run_name='__main__')"]) for form in forms}
    host = {"cpus": os.cpu_count(), "workers": args.workers, "cache": "warm"}
    for label, settings in SOURCE_SETTINGS.items():
        base = None
        for form, src in forms.items():
            size = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
            cat(sorted(p for p in src.rglob("*") if p.is_file()))  # warm the page cache
            t = time_best(lambda d: shard(src, d, settings, args.workers, args.samples_per_shard), args.repeats,
                          args.tmp)
            base = base or t
            out = tmp_root / "counted"
            flags = [f for f in label.split() if label != "defaults"]
            read = bytes_read([sys.executable, str(MAKE_SHARDS), "--data_path", str(src), "--out", str(out),
                               "--workers", str(args.workers), "--samples-per-shard", str(args.samples_per_shard),
                               *flags]) - startup[form]
            shutil.rmtree(out, ignore_errors=True)
            shards = -(-n // args.samples_per_shard)
            print(json.dumps(line(f"make_shards from {form}, {label}", n, size, t, **host,
                                  shards_per_s=round(shards / t, 2), ratio_vs_imagefolder=round(base / t, 3),
                                  source_MB=round(size / 1e6, 1), read_MB=round(read / 1e6, 1),
                                  read_vs_cat=round(read / size, 3))), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_path", type=Path, required=True, help="ImageFolder root (train/, val/)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="make_shards workers")
    p.add_argument("--samples-per-shard", type=int, default=100, help="small, so W workers share the work")
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    p.add_argument("--cold", action="store_true", help="drop the page cache before every timed run (root)")
    p.add_argument("--tmp", type=Path, help="where the shards are written (default: system temp folder)")
    p.add_argument("--sources", action="store_true", help="time make_shards from the ILSVRC2012 tars, parquet and "
                                                           "webdataset tars repacked from SRC, against SRC")
    args = p.parse_args(argv)
    files = source_files(args.data_path)
    if not files:
        print(f"bench_shards: error: no files under {args.data_path}/train or /val", file=sys.stderr)
        return 2
    if args.sources:
        tmp_root = Path(tempfile.mkdtemp(prefix="bench_sources_", dir=args.tmp))
        try:
            bench_sources(args, tmp_root)
        finally:
            shutil.rmtree(tmp_root, ignore_errors=True)
        return 0
    nbytes = cat(files)  # warm the page cache for both sides
    host = {"cpus": os.cpu_count(), "workers": args.workers, "cache": "cold" if args.cold else "warm"}
    t_cat = time_best(lambda _: cat(files), args.repeats, args.tmp, args.cold)
    print(json.dumps(line("cat", len(files), nbytes, t_cat, **host)), flush=True)
    t_copy = time_best(lambda d: copy(files, d, args.samples_per_shard), args.repeats, args.tmp, args.cold)
    print(json.dumps(line("copy", len(files), nbytes, t_copy, **host, ratio_vs_cat=round(t_cat / t_copy, 3))),
          flush=True)
    runs = {"make_shards --no-restart-markers --check decode": {"check": "decode", "restart_markers": False},
            "make_shards --no-restart-markers --check header": {"check": "header", "restart_markers": False}}
    if decoder_available("region"):
        runs["make_shards --restart-markers"] = {"restart_markers": True}
    for name, settings in runs.items():
        t = time_best(lambda d: shard(args.data_path, d, settings, args.workers, args.samples_per_shard),
                      args.repeats, args.tmp, args.cold)
        print(json.dumps(line(name, len(files), nbytes, t, **host,
                              ratio_vs_cat=round(t_cat / t, 3), ratio_vs_copy=round(t_copy / t, 3))),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
