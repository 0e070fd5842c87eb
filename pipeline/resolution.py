"""Progressive resolution: the train images' side per epoch, FFCV's `--resolution.min_res/max_res/start_ramp/end_ramp`.

`min_res` up to epoch `start_ramp`, then a straight line that reaches `max_res` at epoch `end_ramp`, each epoch's side
rounded to the nearest multiple of `step` (FFCV rounds to 32; here `step` is the model's patch size, 32 for
ViT-B/32, so every side is a whole patch grid); `max_res` from `end_ramp` on. Early epochs at a low side are cheap
for a ViT twice over: fewer pixels to decode and resize, and fewer tokens (a 160 px image is 25 patches of 32 against
49 at 224), with attention growing as their square. Torch-free: the host workers read it.
"""
from __future__ import annotations

from dataclasses import dataclass


class ScheduleError(ValueError):
    """A schedule that cannot work; the message names the flag."""


# The flags' help, for every command that takes them (train.py, python -m pipeline.bench)
FLAG_HELP = {
    "min_res": "progressive resolution (FFCV's): the train side up to --start-ramp, rising linearly to --max-res at "
               "--end-ramp, in multiples of the patch size; 0 = --img-size throughout",
    "max_res": "progressive resolution: the train side from --end-ramp on; 0 = --img-size",
    "start_ramp": "progressive resolution: the last epoch at --min-res",
    "end_ramp": "progressive resolution: the first epoch at --max-res",
}


def from_flags(min_res: int, max_res: int, start_ramp: int, end_ramp: int, img_size: int,
               step: int) -> "ResSchedule | None":
    """The schedule the four flags give (`max_res` 0: `img_size`), validated; None without --min-res. ScheduleError
    for flags that cannot work, naming them."""
    if not min_res:
        if max_res or start_ramp or end_ramp:
            raise ScheduleError("--max-res, --start-ramp and --end-ramp shape a schedule that --min-res starts")
        return None
    if not end_ramp:
        raise ScheduleError(f"--min-res {min_res}: give --end-ramp (the first epoch at --max-res) and --start-ramp "
                            f"(the last at --min-res)")
    schedule = ResSchedule(min_res, max_res or img_size, start_ramp, end_ramp, step)
    schedule.validate()
    return schedule


@dataclass(frozen=True)
class ResSchedule:
    min_res: int
    max_res: int
    start_ramp: int  # epochs
    end_ramp: int
    step: int = 32  # every side is a multiple of it

    def validate(self) -> None:
        for name in ("min_res", "max_res", "step"):
            if getattr(self, name) < 1:
                raise ScheduleError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.min_res > self.max_res:
            raise ScheduleError(f"--min-res {self.min_res} is above --max-res {self.max_res}")
        for name in ("min_res", "max_res"):
            if getattr(self, name) % self.step:
                raise ScheduleError(f"--{name.replace('_', '-')} {getattr(self, name)} is not a multiple of "
                                    f"{self.step} (the patch size)")
        if not 0 <= self.start_ramp <= self.end_ramp:
            raise ScheduleError(f"--start-ramp {self.start_ramp} and --end-ramp {self.end_ramp}: need "
                                f"0 <= start <= end")

    def size(self, epoch: int) -> int:
        """The side of epoch `epoch`'s train images."""
        if epoch <= self.start_ramp:
            return self.min_res
        if epoch >= self.end_ramp:
            return self.max_res
        along = self.min_res + (self.max_res - self.min_res) * (epoch - self.start_ramp) / (self.end_ramp -
                                                                                           self.start_ramp)
        return round(along / self.step) * self.step  # round half to even, as FFCV's np.round

    def sizes(self, epochs: int) -> list[int]:
        return [self.size(e) for e in range(epochs)]

    def describe(self, epochs: int) -> str:
        """`64 px (epochs 0-2), 96 (3), 128 (4-9)`: each side and its epochs."""
        runs: list[list[int]] = []  # [side, first epoch, last epoch]
        for epoch, side in enumerate(self.sizes(epochs)):
            if runs and runs[-1][0] == side:
                runs[-1][2] = epoch
            else:
                runs.append([side, epoch, epoch])
        parts = [f"{side}{' px' if i == 0 else ''} (epoch{'s' if a != b else ''} {a}{f'-{b}' if a != b else ''})"
                 for i, (side, a, b) in enumerate(runs)]
        return ", ".join(parts)
