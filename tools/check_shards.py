"""Check a shard set's contents as train.py does before training (--check-shards contents), ahead of a run or to
time the check: each shard's sha256 against the manifest and its `.idx` against the tar's members.

    python tools/check_shards.py --data_path SHARDS [--split train val] [--fresh] [--threads 2]

A shard that passes is remembered in the cache folder ($VIT_FAST_SHARD_CACHE, else ~/.cache/vit-fast/verified-shards)
by the identity of its files, so a later run on this machine starts without reading it again. `--fresh` reads every
shard even when the cache knows it (to measure the check). The last line says how many shards were read, in how many
seconds, at what rate. It needs neither torch nor the source images (tools/make_shards.py --verify compares with
those).

Exit status: 0 every shard is the manifest's; 1 some differ (one line each); 2 usage error (no such shard set).
"""
from __future__ import annotations

import argparse
import sys

from pipeline.shards import contents, storage
from pipeline.shards.errors import ShardError
from pipeline.shards.format import SPLITS, read_manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", "--data-path", required=True, help="shard folder or s3:// prefix")
    parser.add_argument("--split", nargs="+", choices=SPLITS, default=list(SPLITS), help="splits to check")
    parser.add_argument("--fresh", action="store_true", help="read every shard, even those the cache knows")
    parser.add_argument("--threads", type=int, default=contents.THREADS, help="shards read and hashed at once")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    try:
        manifest = read_manifest(args.data_path)
        found = contents.check(args.data_path, manifest, args.split, progress=True, fresh=args.fresh,
                               threads=args.threads)
    except (ShardError, OSError) as e:
        print(f"check_shards: error: {e}", file=sys.stderr)
        return 2
    sizes = storage.file_sizes(args.data_path)
    unlike = [s.name for split in args.split if split in manifest.splits for s in manifest.splits[split].shards
              if sizes.get(s.name) != s.bytes]
    for name in unlike:
        print(f"{storage.join(args.data_path, name)}: missing, or not of the manifest's size")
    for name, problem in sorted(found.problems.items()):
        print(f"{storage.join(args.data_path, name)}: {problem}")
    print(found.lines()[0] + (f"; {found.cache_note}" if found.cache_note else ""))
    return 1 if found.problems or unlike else 0


if __name__ == "__main__":
    sys.exit(main())
