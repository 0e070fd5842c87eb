"""Shards -> batches on the device, and the shard format both ways.

`build_loader` is the one entry point train.py and the benchmarks use: the backend is a name, every backend honours
the contract in `pipeline/contract.py`, and each declares its own typed options (`HostOptions`, `DaliOptions`).
The on-disk format lives in `pipeline/format.py`, its writer in `pipeline/writer.py`, the epoch/rank plan in
`pipeline/plan.py`.
"""
from __future__ import annotations

import torch

from pipeline.contract import BACKENDS, IMAGENET_CLASSES, Loader, LoaderSpec, endless, timed
from pipeline.format import PipelineError, ShardError


def build_loader(*, data_path=None, split: str = "train", backend: str = "host", batch_size: int,
                 device: torch.device | str, rank: int = 0, world_size: int = 1, workers: int = 4, seed: int = 0,
                 img_size: int = 224, **more) -> Loader:
    """A loader for one rank. `more` takes any other LoaderSpec field (dtype, mean, std, crop_pct, prefetch,
    on_error, options, ...); unknown names raise TypeError rather than being ignored."""
    spec = LoaderSpec(data_path=None if data_path is None else str(data_path), split=split, batch_size=batch_size,
                      device=torch.device(device), rank=rank, world_size=world_size, workers=workers, seed=seed,
                      img_size=img_size, **more)
    spec.validate()
    if backend == "host":
        from pipeline.host import HostLoader
        return HostLoader(spec)
    if backend == "dali":
        from pipeline.dali import DaliLoader  # raises one clear line when DALI is not installed
        return DaliLoader(spec)
    if backend == "hybrid":
        from pipeline.hybrid import HybridLoader  # DALI and host workers, each a share of the batches
        return HybridLoader(spec)
    if backend == "synthetic":
        from pipeline.synthetic import SyntheticLoader
        return SyntheticLoader(spec)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def options_class(backend: str):
    """The typed options class of `backend` (None for one without options). Importing it does not import DALI."""
    if backend == "host":
        from pipeline.host import HostOptions
        return HostOptions
    if backend == "dali":
        from pipeline.dali import DaliOptions
        return DaliOptions
    if backend == "hybrid":
        from pipeline.hybrid import HybridOptions
        return HybridOptions
    return None


__all__ = ["build_loader", "options_class", "LoaderSpec", "Loader", "BACKENDS", "IMAGENET_CLASSES", "endless",
           "timed", "PipelineError", "ShardError"]
