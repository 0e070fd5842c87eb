"""The image sides a run uses, found once from the model and the flags, then handed to the model (its position
embedding's resampling), torch.compile (one graph per side) and the loaders (the schedule, the eval side)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from model import build_model
from pipeline.resolution import ResSchedule
from trainlib.config import ConfigError, TrainConfig


@dataclass(frozen=True)
class RunShape:
    patch: int  # the model's patch side (1 for a model without patches): every side is a multiple of it
    img_size: int  # the model's own grid (--img-size)
    schedule: ResSchedule | None  # the train side per epoch (--min-res); None: img_size throughout
    eval_side: int  # --eval-img-size, else the last epoch's train side
    epochs: int

    def train_side(self, epoch: int) -> int:
        return self.schedule.size(epoch) if self.schedule is not None else self.img_size

    @property
    def train_sides(self) -> list[int]:
        """Each epoch's train side."""
        return [self.train_side(e) for e in range(self.epochs)]

    @property
    def sides(self) -> set[int]:
        """Every side the model sees, train and eval."""
        return {*self.train_sides, self.eval_side}

    @property
    def dynamic(self) -> bool:
        """Whether the model sees sides other than its grid: then timm resamples its position embedding to each
        input's patch grid (`dynamic_img_size`), a no-op at its own grid."""
        return any(side != self.img_size for side in self.sides)


def run_shape(cfg: TrainConfig, model: torch.nn.Module | None = None) -> RunShape:
    """The shape of a run of `cfg` (its model built on the meta device when not given: nothing is allocated).
    ConfigError for a side off the model's patch grid, naming the flag."""
    if model is None:
        with torch.device("meta"):
            model = build_model(cfg.model, num_classes=1, img_size=cfg.img_size)
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    step = patch[0] if patch else 1
    for flag, side in (("--img-size", cfg.img_size), ("--eval-img-size", cfg.eval_img_size)):
        if patch and (side % patch[0] or side % patch[1]):
            raise ConfigError(f"{flag} {side} is not a multiple of {cfg.model}'s patch size {patch[0]}")
    schedule = cfg.res_schedule(step)  # ConfigError: a --min-res/--max-res off the patch grid
    last = schedule.size(cfg.epochs - 1) if schedule is not None and cfg.epochs else cfg.img_size
    return RunShape(step, cfg.img_size, schedule, cfg.eval_img_size or last, cfg.epochs)
