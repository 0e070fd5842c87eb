"""Pack ImageNet as you hold it into webdataset tar shards: an ImageFolder, the ILSVRC2012 download tars, Hugging Face
parquet files or existing webdataset tars.

    python tools/make_shards.py --data_path SRC --out DST [--samples-per-shard 1000] [--workers 8]
    python tools/make_shards.py --data_path SRC --out s3://BUCKET/PREFIX [--staging DIR]   # into object storage

SRC is, told apart by its names (the first line printed says which): an ImageFolder (`SRC/train/<class>/*`,
`SRC/val/<class>/*`); a folder with `ILSVRC2012_img_train.tar`, `ILSVRC2012_img_val.tar` and
`ILSVRC2012_devkit_t12.tar.gz`, read in place; `train-*.parquet` / `validation-*.parquet` files anywhere under it;
or webdataset tars (named with the word train, val or validation, e.g. `imagenet-train-000012.tar`, or in train/
and val/ folders).

Writes `DST/{train,val}-NNNNNN.tar` (+ a DALI `.idx` beside each), `DST/classes.json`, timm's
`DST/_info.json` and `DST/manifest.json`. Every file appears under its final name only when complete;
a rerun resumes an interrupted run and gives byte-identical output. See docs/data.md.

Exit status: 0 all files packed; 3 done, but some files were rejected (listed in the manifest);
2 usage error (bad arguments, missing/empty SRC, a source unreadable as its kind, DST holds other shards);
4 --verify found a mismatch;
1 other failure (e.g. disk full); 130 interrupted.
"""
from __future__ import annotations

import os
import signal
import sys

INTERRUPTED = "make_shards: interrupted; finished shards are kept, rerun the same command to resume"
if __name__ == "__main__":
    # A Ctrl-C while the libraries below load: the same line and status as later, at once. Left to Python, it is a
    # traceback, or, landing in a C extension's init, an ImportError that code may take for a missing package.
    signal.signal(signal.SIGINT, lambda *_: (sys.stderr.write(INTERRUPTED + "\n"), os._exit(130)))

import argparse  # noqa: E402 (after the handler above)
import re
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path

from pipeline.cli import CommandParser, add_flags, from_args, knob
from pipeline.shards import verify, writer
from pipeline.shards.errors import ShardError, UsageError
from pipeline.shards.format import MANIFEST, Manifest, Settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REJECTED, EXIT_VERIFY, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
DEFAULTS = Settings()


def folder_arg(text: str) -> Path | str:
    # Path("") would quietly become the current folder, and Path would fold the // of an s3:// URL.
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text if text.startswith("s3://") else Path(text)


@dataclass
class ShardsConfig:
    """The command line. A field named like a `Settings` field is that setting, None where not given: the writer
    then keeps the value of the plan already in DST (a plain rerun resumes), else takes `Settings`' default."""

    data_path: Path | str = knob(None, "the source: an ImageFolder root (train/, val/), a folder with the ILSVRC2012 "
                                       "tars and devkit, parquet files or webdataset tars", flag="--data_path",
                                 required=True, parse=folder_arg)
    out: Path | str = knob(None, "output folder for shards, or s3://BUCKET/PREFIX (credentials and endpoint from AWS_* "
                                 "environment variables; docs/data.md)", required=True, parse=folder_arg)
    staging: Path | str | None = knob(None, "with an s3:// --out: local folder where shards are built before upload",
                                      parse=folder_arg, default_help="a temporary folder; it holds about one shard "
                                                                     "per worker at a time")
    samples_per_shard: int | None = knob(None, "samples per tar shard", default_help=str(DEFAULTS.samples_per_shard))
    workers: int = knob(os.cpu_count() or 1, "processes; 1 = in-process", default_help="every core of this machine")
    max_side: int | None = knob(None, "re-encode images longer than this (px)", default_help="keep")
    quality: int | None = knob(None, "JPEG quality of re-encoded images", default_help=str(DEFAULTS.quality))
    seed: int | None = knob(None, "shuffle seed", default_help=str(DEFAULTS.seed))
    check: str | None = knob(None, "decode: Pillow fully decodes each image; header: faster, only catches unreadable "
                                   "headers and cut-off JPEGs", choices=("decode", "header"),
                             default_help=DEFAULTS.check)
    restart_markers: bool | None = knob(None, "re-encode each JPEG losslessly (the same pixels) with a restart "
                                              "marker after every MCU, so the host backend decodes only a crop's "
                                              "blocks: about 1.4x its decode rate for about the same bytes "
                                              "(docs/data.md)", default_help="on where the region decoder is built")
    verify: bool = knob(False, "re-read all shards and check them against SRC")
    overwrite: bool = knob(False, "replace shards of another data set/settings in DST")

    def given(self) -> dict:
        """What `writer.resolve_settings` takes: the settings flags, None where not given."""
        settings = {f.name for f in fields(Settings)}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in settings}


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(description=__doc__.split("\n\n")[0])
    add_flags(p, ShardsConfig)
    return p


def parse_args(argv=None) -> ShardsConfig:
    return from_args(ShardsConfig, vars(build_parser().parse_args(argv)))


def print_summary(manifest: Manifest, limit: int = 20) -> None:
    for name, s in manifest.splits.items():
        print(f"{name}: {s.num_files} files = {s.num_samples} in {len(s.shards)} shards"
              f" + {s.num_rejected} rejected + {s.num_ignored} ignored")
    if manifest.converted:
        kinds = Counter(re.sub(r" \d+x\d+ -> \d+x\d+", "", c["reason"]) for c in manifest.converted)
        print(f"converted {len(manifest.converted)}: " + ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items())))
    if manifest.rejected:
        print(f"rejected {len(manifest.rejected)}:")
        for r in manifest.rejected[:limit]:
            print(f"  {r['path']}: {r['reason']}")
        if len(manifest.rejected) > limit:
            print(f"  ... {len(manifest.rejected) - limit} more, see {MANIFEST}")


def run(args: ShardsConfig) -> int:
    manifest, scan = writer.write_shards(args.data_path, args.out, args.given(), args.workers, args.overwrite,
                                         args.staging)
    print_summary(manifest)
    out = args.out if isinstance(args.out, str) else os.path.abspath(args.out)
    if args.verify and verify.verify(out, scan, manifest):
        return EXIT_VERIFY
    return EXIT_REJECTED if manifest.rejected else EXIT_OK


def main(argv=None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # one that lands while _main reports or cleans up
        print(INTERRUPTED, file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(argv) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except writer.ShardWriteError as e:
        print(f"make_shards: error: {e}; temporary files removed, finished shards kept", file=sys.stderr)
        return EXIT_FAILED
    except ShardError as e:  # object storage that cannot be used: credentials, endpoint, bucket
        print(f"make_shards: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as e:
        print(f"make_shards: error: {e.strerror or e}: {e.filename or ''}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here a Ctrl-C unwinds: temporary files go
    status = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the work is over: a Ctrl-C as the interpreter exits changes nothing
    sys.exit(status)
