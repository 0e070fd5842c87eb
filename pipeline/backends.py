"""The backends, each registered once: its name, its loader class and its typed options class (imported only when
that backend is asked for, so that naming DALI does not import it), and the facts about it that callers decide by.
`build_loader`, train.py's config and both benchmarks read this table; no other module spells a backend's name.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass

import torch

from pipeline.loader import Loader, LoaderSpec


@dataclass(frozen=True)
class Backend:
    name: str
    module: str  # where its classes live
    loader: str  # its Loader subclass
    options: str | None  # its typed options class (flags: --<name>-*), None: no options
    help: str
    reads_shards: bool = True  # False: data_path is optional
    skips_bad_samples: bool = False  # supports on_error="skip"

    def loader_class(self) -> type[Loader]:
        return getattr(importlib.import_module(self.module), self.loader)

    def options_class(self) -> type | None:
        return getattr(importlib.import_module(self.module), self.options) if self.options else None


REGISTRY = {b.name: b for b in (
    Backend("host", "pipeline.host", "HostLoader", "HostOptions", "Pillow worker processes", skips_bad_samples=True),
    Backend("dali", "pipeline.dali", "DaliLoader", "DaliOptions", "NVIDIA DALI (GPU decode; CPU operators elsewhere)"),
    Backend("hybrid", "pipeline.hybrid", "HybridLoader", "HybridOptions",
            "DALI and host workers, each a share of the batches"),
    Backend("synthetic", "pipeline.synthetic", "SyntheticLoader", None, "one random batch resident on the device",
            reads_shards=False),
)}
BACKENDS = tuple(REGISTRY)
WITH_OPTIONS = tuple(name for name, b in REGISTRY.items() if b.options)  # the config fields holding options
SUMMARY = ", ".join(f"{b.name} = {b.help}" for b in REGISTRY.values())  # for --backend's help


def get_backend(name: str) -> Backend:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}") from None


def options_from(config, name: str):
    """Backend `name`'s options out of a config that holds one field per backend with options (train.py's
    TrainConfig, pipeline.bench's BenchConfig): what `build_loader(options=...)` takes; None for a backend without.
    Parts declared shared (hybrid's dali and host) are the config's own fields of those names."""
    if not get_backend(name).options:
        return None
    options = getattr(config, name)
    shared = {f.name: getattr(config, f.name) for f in dataclasses.fields(options) if f.metadata.get("shared")}
    return dataclasses.replace(options, **shared)


def build_loader(*, data_path=None, split: str = "train", backend: str = "host", batch_size: int,
                 device: torch.device | str, rank: int = 0, world_size: int = 1, workers: int = 4, seed: int = 0,
                 img_size: int = 224, **more) -> Loader:
    """A loader for one rank. `more` takes any other LoaderSpec field (dtype, mean, std, crop_pct, prefetch,
    on_error, options, ...); unknown names raise TypeError rather than being ignored."""
    chosen = get_backend(backend)
    spec = LoaderSpec(data_path=None if data_path is None else str(data_path), split=split, batch_size=batch_size,
                      device=torch.device(device), rank=rank, world_size=world_size, workers=workers, seed=seed,
                      img_size=img_size, **more)
    spec.validate()
    return chosen.loader_class()(spec)  # the dali backend raises one clear line when DALI is not installed
