"""The shard set, both ways, without torch: what `tools/make_shards.py` writes and what every loader reads.

  errors.py       the one-line errors of the whole input side
  format.py       the only module that knows the set's file names, members, label encoding and index layout
  storage.py      where the files live: a folder or an S3 prefix
  atomicio.py     writes under a temporary name, then a rename
  imagefolder.py  the source ImageFolder: its files, labels and keys, and which shard each goes to
  jpeg.py         the lossless re-encode with restart markers, and the region decoder that uses them
  writer.py       ImageFolder -> shards (parallel, resumable)
  verify.py       shards -> checked against the manifest and the source tree
  reader.py       (shard, sample) -> JPEG bytes and label, through the index: the one reader of both backends
"""
