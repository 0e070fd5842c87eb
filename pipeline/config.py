"""The data and loader knobs every command shares, declared once: `DataConfig`, which train.py's `TrainConfig` and
`python -m pipeline.bench`'s `BenchConfig` extend (so their flags, their config.json keys and their meaning are the
same), and `loader_args`, the one way from it to `build_loader`'s arguments."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.augment import AA_FLAG_HELP, COLOR_JITTER_FLAG_HELP
from pipeline.backends import BACKENDS, SUMMARY, options_from
from pipeline.cli import knob
from pipeline.dali import DaliOptions
from pipeline.host import HostOptions
from pipeline.hybrid import HybridOptions
from pipeline.resolution import FLAG_HELP as RES_HELP, ResSchedule, from_flags
from pipeline.shards.format import ShardSet, open_shard_set

# --workers left out: per backend. DALI feeds the H100 best with 8 threads a rank (docs/benchmarks.md: 0.869 of the
# step rate against 0.825 with 4); hybrid's one count is also its host part's processes, so it keeps 4 with the host.
DEFAULT_WORKERS, OTHER_WORKERS = {"dali": 8}, 4


@dataclass
class DataConfig:
    data_path: str = knob(None, "shard folder written by tools/make_shards.py (synthetic backend: optional)",
                          "--data-path", flag="--data_path")
    backend: str = knob("host", f"input pipeline (pipeline/): {SUMMARY}", choices=BACKENDS)
    workers: int = knob(None, "decode processes (host) or threads (dali) per rank (hybrid: both its parts); None = "
                              f"the backend's own, {DEFAULT_WORKERS['dali']} for dali and {OTHER_WORKERS} otherwise "
                              "(config.json holds the value used)", "-j")
    host: HostOptions = knob(help="the host backend's own options", factory=HostOptions)
    dali: DaliOptions = knob(help="the dali backend's own options", factory=DaliOptions)
    hybrid: HybridOptions = knob(help="the hybrid backend's own option", factory=HybridOptions)
    img_size: int = knob(224, "train/eval resolution, and the model's (its position-embedding grid)")
    min_res: int = knob(0, RES_HELP["min_res"])
    max_res: int = knob(0, RES_HELP["max_res"])
    start_ramp: int = knob(0, RES_HELP["start_ramp"])
    end_ramp: int = knob(0, RES_HELP["end_ramp"])
    aa: str = knob(None, AA_FLAG_HELP, metavar="SPEC")
    color_jitter: str = knob(None, COLOR_JITTER_FLAG_HELP, metavar="X")

    def resolve_workers(self) -> None:
        """--workers left out: the backend's own count, resolved once so that the config written and the loaders
        see the same number."""
        if self.workers is None:
            self.workers = DEFAULT_WORKERS.get(self.backend, OTHER_WORKERS)

    def res_schedule(self, step: int) -> ResSchedule | None:
        """The train side per epoch (pipeline/resolution.py), in multiples of `step` (the model's patch side); None:
        a fixed --img-size. ScheduleError (a ValueError) naming the flag for one that cannot work."""
        return from_flags(self.min_res, self.max_res, self.start_ramp, self.end_ramp, self.img_size, step)

    def open_data(self) -> ShardSet | None:
        """The shard set at --data_path, opened once per process start and handed to everything that needs it (None
        without one)."""
        return open_shard_set(self.data_path) if self.data_path else None

    def backend_options(self):
        """What `build_loader(options=...)` takes for this config's backend."""
        return options_from(self, self.backend)


def loader_args(cfg: DataConfig, split: str, schedule: ResSchedule | None = None) -> dict:
    """`build_loader`'s arguments that `cfg` decides for `split`: where the shards are, the backend and its options,
    the workers, the side (train under `schedule`: its largest, for the buffers, and the schedule) and the
    augmentation. The caller adds the batch, the device, the rank and what else it alone knows."""
    sides = dict(img_size=schedule.max_res, res_schedule=schedule) if schedule and split == "train" else \
        dict(img_size=cfg.img_size)
    return dict(data_path=cfg.data_path, split=split, backend=cfg.backend, workers=cfg.workers,
                options=cfg.backend_options(), aa=cfg.aa, color_jitter=cfg.color_jitter, **sides)
