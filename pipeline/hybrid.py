"""The hybrid backend: per rank, DALI (the GPU's JPEG engines, or its CPU operators) and the host workers (Pillow on
the CPU cores) each make a share of every epoch's batches, and the loader yields them in batch order.

Both decoders read through the one reader in the order `pipeline/plan.py` decides, so the hybrid yields exactly the
samples each of them would, batch for batch; only which decoder made a batch (and so its crops) differs. The split
is a fixed share (`HybridOptions.dali_share`), spread evenly over the epoch (`plan.share_of`): set it to DALI's
rate / (DALI's + the host's), each measured alone with `python -m pipeline.bench`, so that neither waits for the
other. Both parts run on across epoch boundaries, as their backends do alone.
"""
from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass

from pipeline.cli import knob
from pipeline.dali import DaliLoader, DaliOptions
from pipeline.host import HostLoader, HostOptions
from pipeline.loader import Loader, LoaderSpec
from pipeline.plan import Position, share_of


@dataclass(frozen=True)
class HybridOptions:
    """The hybrid backend's own knob, and the options of its two parts."""

    dali_share: float = knob(0.5, "hybrid: share of each epoch's batches that DALI decodes; the host workers decode "
                                  "the rest. Set it to DALI's img/s / (DALI's + host's), each measured alone")
    dali: DaliOptions = knob(help="the DALI part's options: the run's --dali-*", factory=DaliOptions, shared=True)
    host: HostOptions = knob(help="the host part's options: the run's --host-*", factory=HostOptions, shared=True)

    def validate(self) -> None:
        if not 0.0 < self.dali_share < 1.0:
            raise ValueError(f"dali_share must be between 0 and 1 (exclusive; 0 or 1 is a plain backend), got "
                             f"{self.dali_share!r}")
        self.dali.validate()
        self.host.validate()


class HybridLoader(Loader):
    def __init__(self, spec: LoaderSpec):
        super().__init__(spec)
        self.opts = spec.backend_options(HybridOptions)
        share = self.opts.dali_share
        self.dali = DaliLoader(dataclasses.replace(spec, options=self.opts.dali, part=(share, 0)))
        try:
            self.host = HostLoader(dataclasses.replace(spec, options=self.opts.host, part=(share, 1),
                                                       shards=self.dali.shard_set))
        except BaseException:
            self.dali.close()
            raise
        self.num_workers = self.host.num_workers
        self.num_samples, self.fingerprint = self.host.num_samples, self.host.fingerprint
        if not len(self.dali) or not len(self.host):
            self.close()
            raise ValueError(f"dali_share {share} leaves one decoder none of the {self.batches_in()} batches an "
                             f"epoch; use that decoder's backend alone")

    def batches_in(self, epoch: int | None = None) -> int:
        # The parts stand where this loader does (_batches places them): the whole epoch is theirs together.
        if epoch is None or epoch != self.epoch or not self.position.stages:
            return self.dali.whole.plan(0).steps
        return self.position.offset + self.dali.planner_for(self.position).plan(epoch).steps

    @property
    def bytes_read(self) -> int:
        return self.dali.bytes_read + self.host.bytes_read

    @property
    def skipped_shards(self) -> dict[str, int]:
        return self.host.skipped_shards  # DALI supports on_error="raise" only

    def _batches(self, position: Position):
        # Each part stands at its own count of the batches before the position; a short rest of a resumed epoch may
        # leave one part none, which it then skips.
        count = len(self) - position.offset  # this layout's batches of the epoch
        mine = share_of(count, self.opts.dali_share, 0)
        done = bisect.bisect_left(mine, position.local)
        self.dali.position = Position(position.epoch, position.stages, position.offset + done)
        self.host.position = Position(position.epoch, position.stages, position.batch - done)
        dali, host, mine = iter(self.dali), iter(self.host), set(mine)
        for index in range(position.local, count):
            yield next(dali) if index in mine else next(host)

    def describe(self) -> str:
        return (f"hybrid: {len(self.dali)} of {self.batches_in()} batches an epoch by {self.dali.describe()}; the "
                f"other {len(self.host)} by {self.host.describe()}")

    def notes(self) -> list[str]:
        return self.dali.notes() + self.host.notes()

    def close(self) -> None:
        try:
            self.dali.close()
        finally:
            self.host.close()
