"""The shard set, both ways, without torch: what `tools/make_shards.py` writes and what every loader reads.

  errors.py       the one-line errors of the whole input side
  format.py       the only module that knows the set's file names, members, label encoding and index layout
  storage.py      where the files live: a folder or an S3 prefix
  atomicio.py     writes under a temporary name, then a rename
  source.py       what a scanned source is (entries, labels, keys, a reader) and which shard each sample goes to
  detect.py       which kind of source --data_path is, and its scan
  imagefolder.py  an ImageFolder source, and the key rules every source shares
  ilsvrc.py       the ILSVRC2012 download tars and devkit, read in place
  wds.py          existing webdataset tars
  parquet.py      Hugging Face parquet files, read in row batches
  tarindex.py     members of (nested) tars found by their headers and read by offset
  repack.py       an ImageFolder written as those other forms (what the source tests and benchmark read)
  jpeg.py         the lossless re-encode with restart markers, and the region decoder that uses them
  writer.py       source -> shards (parallel, resumable)
  folderlock.py   one process at a time in a folder (make_shards' --out, train.py's --output)
  verify.py       shards -> checked against the manifest and the source
  contents.py     shards -> checked against the manifest's sha256 and class count before training, once per copy
  reader.py       (shard, sample) -> JPEG bytes and label, through the index: the one reader of both backends
"""
