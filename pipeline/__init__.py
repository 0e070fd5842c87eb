"""Shards -> batches on the device. The map, one line per stage and the module that owns it:

  ImageFolder --make_shards--> shard set   pipeline/shards/ (writer, verify, format, storage; torch-free, offline)
  shard set -> epoch plan                   pipeline/plan.py: which samples make batch i of epoch e on rank r
  epoch -> image side                       pipeline/resolution.py: progressive resolution (--min-res; train)
  plan -> encoded samples                   pipeline/shards/reader.py: JPEG bytes + label through the .idx offsets
  samples -> uint8 batch                    pipeline/host.py + host_worker.py (Pillow processes), pipeline/dali.py
                                            (one @pipeline_def; its reader processes run dali_reader.py),
                                            pipeline/hybrid.py (both): the crop, resize and
                                            flip of pipeline/transforms.py, then pipeline/augment.py's ops on the
                                            tile (--aa, --color-jitter; train)
  uint8 batch -> model input on the device  pipeline/transforms.py `to_model_input`
  all of it behind one loader               pipeline/loader.py (`LoaderSpec`, `Loader`: its epoch's position and
                                            its state_dict), pipeline/shard_loader.py (what shard readers share),
                                            pipeline/backends.py (`build_loader`: the registry of backends and their
                                            options), pipeline/config.py (`DataConfig`: the knobs every command shares)
  benchmarks                                pipeline/bench/ (`python -m pipeline.bench`, the torchvision baseline)

`build_loader`, `LoaderSpec` and the other names below are imported from their modules on first use, so that
`import pipeline.shards...` (the offline writer, a CPU-only data-prep box) never imports torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "build_loader": "pipeline.backends", "BACKENDS": "pipeline.backends", "get_backend": "pipeline.backends",
    "LoaderSpec": "pipeline.loader", "Loader": "pipeline.loader", "IMAGENET_CLASSES": "pipeline.loader",
    "Batch": "pipeline.loader", "StateError": "pipeline.loader", "timed": "pipeline.loader",
    "open_shard_set": "pipeline.shards.format", "ShardSet": "pipeline.shards.format",
    "PipelineError": "pipeline.shards.errors", "ShardError": "pipeline.shards.errors",
    "SettingsError": "pipeline.shards.errors",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
