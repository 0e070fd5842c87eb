"""What the backends that read shards share: the shard list and this rank's epoch plan (pipeline/plan.py), one
iteration at a time, and `EpochRun`, the one rule by which a loader's producers (the host workers, DALI's source)
run on from one epoch into the next. The protocol itself, the position and its state are pipeline/loader.py's."""
from __future__ import annotations

from pipeline.loader import Loader, LoaderSpec
from pipeline.plan import EpochPlanner, Position
from pipeline.shards.errors import ShardError
from pipeline.shards.format import open_shard_set, shard_list


class EpochRun:
    """Whether a loader's producers can run on: they make epoch after epoch from where a run started (the host
    workers, DALI's source), so the next epoch's first batches are made while this one's last steps train. `next` is
    the position of the batch they make next, in their own numbering of epochs; a position asked for that is not
    it starts a new run there. Val reads the same batches every epoch, so there any epoch's start follows on."""

    def __init__(self, train: bool):
        self.train = train
        self.number = 0  # numbers the runs: messages about an abandoned run are told apart by it
        self.next: Position | None = None

    def follows(self, position: Position) -> bool:
        if self.next is None:
            return False
        return self.next == position or (not self.train and self.next.batch == position.batch == 0)

    def restart(self, position: Position) -> None:
        self.number, self.next = self.number + 1, position

    def advance(self, count: int) -> None:
        """One batch taken from the producers, of an epoch of `count` in this layout."""
        p = self.next
        self.next = Position(p.epoch, p.stages, p.batch + 1) if p.local + 1 < count else Position(p.epoch + 1)

    def stop(self) -> None:
        """The producers are gone: the next iteration starts a new run."""
        self.next = None


class ShardLoader(Loader):
    """A loader that reads shards: this rank's plan over the split, and one iteration at a time. A backend defines
    `start_run(position)` (its producers begin a new run, `self.run`, there) and `take(k, index, epoch)` (the run's
    next batch: the k-th of `epoch` this loader makes, rank-local batch `index`, moved on from the producers)."""

    def __init__(self, spec: LoaderSpec, backend: str):
        super().__init__(spec)
        if spec.data_path is None:
            raise ValueError(f"the {backend} backend reads shards: pass data_path (a folder made by "
                             f"tools/make_shards.py)")
        self.shard_set = spec.shards or open_shard_set(spec.data_path)
        self.manifest = self.shard_set.manifest
        shards = shard_list(spec.data_path, spec.split, self.manifest, spec.shard_problems)
        unlike = [s for s in shards if s.problem]
        if unlike and spec.on_error == "raise":  # before a sample is trained on; "skip" counts each of their samples
            more = f" (and {len(unlike) - 1} more shards)" if len(unlike) > 1 else ""
            raise ShardError(f"{unlike[0].path}: {unlike[0].problem}{more}")
        self.whole = spec.planner(shards)  # the plan of every epoch no other layout read part of
        self.num_samples = sum(s.num_samples for s in shards)
        self.fingerprint = self.shard_set.fingerprint(spec.split)
        self._rest: EpochPlanner | None = None  # the plan of the position's epoch (rule 6 after an elastic resume)
        self.steps = len(self.whole_batches)  # a whole epoch's; raises when the split cannot fill a batch per rank
        self.run = EpochRun(spec.train)
        self._iteration = 0

    def planner_for(self, position: Position) -> EpochPlanner:
        """The plan `position`'s epoch follows: with the stages that read part of it before, and the same object for
        the same stages (the plan caches key on it)."""
        rest = self._rest
        if rest is None or (rest.resumed_epoch, rest.stages) != (position.epoch, position.stages):
            self._rest = rest = self.whole.at(position.epoch, position.stages)
        return rest

    @property
    def planner(self) -> EpochPlanner:
        return self.planner_for(self.position)

    def batches_of(self, epoch: int, position: Position | None = None) -> list[int]:
        """The rank-local batch indices this loader makes in `epoch` (a hybrid's part), in the plan of `position`."""
        return self.spec.batches(self.planner_for(position or self.position).plan(epoch).steps)

    @property
    def whole_batches(self) -> list[int]:
        """The rank-local batch indices this loader makes in a whole epoch."""
        return self.spec.batches(self.whole.plan(0).steps)

    def batches_in(self, epoch: int | None = None) -> int:
        if epoch is None or epoch != self.position.epoch or not self.position.stages:
            return self.steps
        return self.position.offset + len(self.batches_of(epoch))

    def start_run(self, position: Position) -> None:
        raise NotImplementedError

    def take(self, k: int, index: int, epoch: int):
        raise NotImplementedError

    def finish(self, taken):
        """What `take` returned, as the consumer gets it (a backend that takes ahead finishes the transfer here)."""
        return taken

    def ahead(self) -> int:
        """Batches taken before the consumer asks for them."""
        return 0

    def _batches(self, position: Position):
        self._iteration += 1  # a new iteration abandons any earlier one still suspended
        iteration = self._iteration
        if not self.run.follows(position):
            self.run.restart(position)
            try:
                self.start_run(position)
            except BaseException:
                self.close()  # and so the run stops: the next iteration starts one anew
                raise
        batches = self.batches_of(position.epoch, position)
        pending, k_next = [], position.local
        for _ in range(position.local, len(batches)):
            if iteration != self._iteration:  # outside the try below: the newer iteration goes on
                raise RuntimeError(f"a newer iteration over this {type(self).__name__} replaced this one")
            try:
                while len(pending) <= self.ahead() and k_next < len(batches):
                    pending.append(self.take(k_next, batches[k_next], self.run.next.epoch))
                    self.run.advance(len(batches))
                    k_next += 1
                batch = self.finish(pending.pop(0))
            except BaseException:
                self.close()  # decode errors, Ctrl-C: no orphans, no leaked memory; iterating again starts anew
                raise
            yield batch  # a consumer that stops early: the next iteration runs on if this epoch was all taken
