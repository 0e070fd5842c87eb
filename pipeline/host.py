"""The host backend: Pillow worker processes decode into shared-memory uint8 batches; the main process only moves
them to the device and normalizes there.

Why this shape (measured, see docs/pipeline.md): a parent that reads files and feeds a process pool caps out on its
own pipe long before the cores do, and float pixels would be four times the bytes to move and copy. So each worker
reads its own stretch of shards (seeking through the `.idx` index), decodes straight to the output size in uint8,
and hands over a slot number; the parent copies the slot out (into pinned memory on an accelerator), returns the
slot, and runs `to_model_input` on the device, `spec.prefetch` batches ahead on a side stream. Its own knobs:
`HostOptions`.
"""
from __future__ import annotations

import multiprocessing as mp
import fcntl
import os
import re
import secrets
import time
import weakref
from dataclasses import dataclass
from multiprocessing import connection, shared_memory

import numpy as np
import torch

from pipeline.augment import KERNELS_BUILT
from pipeline.cli import knob
from pipeline.host_worker import (Crashed, Release, SampleFailed, StartRun, Stop, WorkerConfig, slot_arrays,
                                  slot_nbytes, worker_main)
from pipeline.loader import LoaderSpec
from pipeline.plan import worker_of
from pipeline.processes import main_not_replayed, one_thread_each, own_temp_folder, stop_signals_blocked
from pipeline.shard_loader import ShardLoader
from pipeline.shards import storage
from pipeline.shards.errors import PipelineError, SampleError, ShardError
from pipeline.shards.jpeg import DECODERS, decoder_available, default_decoder, pillow_is_simd
from pipeline.transforms import to_model_input

SHM_DIR = "/dev/shm"
SHM_NAME = re.compile(r"vitpipe_(\d+)_[0-9a-f]{8}_\d+_\d+$")  # vitpipe_<parent pid>_<token>_<worker>_<slot>
FRESH_SEGMENT_S = 2.0  # a slot this young is left alone by other loaders' clean-up (unlink_stale_segments)
START_METHODS = ("forkserver", "spawn")

__all__ = ["HostLoader", "HostOptions", "WorkerError", "SampleError", "pillow_flavour"]


@dataclass(frozen=True)
class HostOptions:
    """The host backend's own knobs (train.py: `--host-*`)."""

    slots_per_worker: int = knob(2, "host: shared-memory batch slots per decode process (its lead over the trainer)")
    timeout_s: float = knob(300.0, "host: a decode process silent this long is an error (hung decode, dead disk)")
    start_method: str = knob("forkserver", "host: how decode processes start (never a fork of a process that holds "
                                           "CUDA/NPU state)", choices=START_METHODS)
    decoder: str = knob("auto", "host: 'region' decodes only each crop box (the C extension, built at install "
                                "where libjpeg's headers are); 'pillow' decodes whole images; 'auto': region when "
                                "built", choices=("auto", *DECODERS))

    def validate(self) -> None:
        if self.slots_per_worker < 1:
            raise ValueError(f"slots_per_worker must be >= 1, got {self.slots_per_worker}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.start_method not in START_METHODS:
            raise ValueError(f"start_method must be one of {START_METHODS}, got {self.start_method!r}")
        if self.decoder not in ("auto", *DECODERS):
            raise ValueError(f"decoder must be one of auto, {', '.join(DECODERS)}, got {self.decoder!r}")
        if not decoder_available(self.resolved_decoder):
            raise ValueError("decoder 'region' is not built: reinstall with libjpeg's headers present (Debian/Ubuntu: "
                             "apt-get install libjpeg-dev; then pip install -e .), or use decoder 'pillow'")

    @property
    def resolved_decoder(self) -> str:
        return default_decoder() if self.decoder == "auto" else self.decoder


class WorkerError(PipelineError):
    """A decode process died or raised; one line says what and where (a crash's traceback is in the file it names)."""


def pillow_flavour() -> str:
    """'Pillow-SIMD 9.5.0.post1 (libjpeg-turbo 3.0.4)' or 'Pillow 13.0.0 (libjpeg-turbo 3.2.0)', of the Pillow that
    runs (`pipeline.shards.jpeg.pillow_is_simd`)."""
    import PIL
    from PIL import features

    simd = pillow_is_simd()
    turbo = features.check_feature("libjpeg_turbo")
    jpeg = (features.version_feature("libjpeg_turbo") if turbo else features.version("jpg")) or "?"
    return f"{'Pillow-SIMD' if simd else 'Pillow'} {PIL.__version__} (libjpeg{'-turbo' if turbo else ''} {jpeg})"


class SyncTransfer:
    """CPU (or a device without streams): copy out of the slot and normalize at once; nothing to overlap."""

    def __init__(self, spec: LoaderSpec):
        self.spec = spec

    def start(self, images: np.ndarray, labels: np.ndarray):
        u8 = torch.from_numpy(images).to(self.spec.device)  # on the CPU a view of the slot
        x = to_model_input(u8, self.spec, nhwc=True)
        if x.data_ptr() == u8.data_ptr():  # uint8 channels_last is a mere view of the slot, which goes back to a worker
            x = x.clone(memory_format=torch.channels_last)
        return x, torch.from_numpy(labels.copy()).to(self.spec.device)

    def finish(self, pending):
        return pending


class StreamTransfer:
    """CUDA or Ascend NPU (`torch.npu` mirrors `torch.cuda`'s Stream/Event API): slot -> pinned staging buffer (a CPU
    memcpy, after which the slot is free) -> device on a side stream -> normalize on that stream. The consumer's stream
    waits on an event, so the host never waits for the device. The host does pay one memcpy of each batch into
    pinned memory on the calling thread (38.5 MB at 256 x 224 px); registering the slots themselves as pinned memory
    would save it, a lead for a GPU session to measure."""

    def __init__(self, spec: LoaderSpec, depth: int):
        self.spec, self.device = spec, spec.device
        self.api = getattr(torch, spec.device.type)
        self.stream = self.api.Stream(device=spec.device)
        b, s = spec.batch_size, spec.img_size
        self.staging = [(torch.empty((b, s, s, 3), dtype=torch.uint8).pin_memory(),
                         torch.empty((b,), dtype=torch.int64).pin_memory()) for _ in range(depth)]
        self.copied = [None] * depth  # per staging buffer: event after the H2D copy that last read it
        self.next = 0

    def start(self, images: np.ndarray, labels: np.ndarray):
        k, self.next = self.next, (self.next + 1) % len(self.staging)
        if self.copied[k] is not None:
            # Sync point: the copy that last read this staging buffer must be done before we overwrite it. With
            # prefetch+1 buffers it finished long ago, so this rarely waits.
            self.copied[k].synchronize()
        pinned_images, pinned_labels = self.staging[k]
        if pinned_images.shape != images.shape:  # an epoch at a smaller side (pipeline/resolution.py): its first bytes
            pinned_images = pinned_images.view(-1)[:images.size].view(images.shape)
        # numpy's copy is a plain single-threaded memcpy: torch's copy_ would wake the intra-op pool, whose threads
        # then spin on cores the decode workers need.
        np.copyto(pinned_images.numpy(), images)
        np.copyto(pinned_labels.numpy(), labels)
        with self.api.stream(self.stream):
            dev_images = pinned_images.to(self.device, non_blocking=True)
            dev_labels = pinned_labels.to(self.device, non_blocking=True)
            self.copied[k] = self.api.Event()
            self.copied[k].record(self.stream)
            out = to_model_input(dev_images, self.spec, nhwc=True)
            done = self.api.Event()
            done.record(self.stream)
        return out, dev_labels, done

    def finish(self, pending):
        images, labels, done = pending
        consumer = self.api.current_stream(self.device)
        consumer.wait_event(done)  # device-side ordering only; the host does not wait here
        # Made on the side stream, used on the consumer's: the caching allocator must not recycle them early.
        images.record_stream(consumer)
        labels.record_stream(consumer)
        return images, labels


def make_transfer(spec: LoaderSpec, depth: int):
    api = getattr(torch, spec.device.type, None)
    if spec.device.type != "cpu" and hasattr(api, "Stream") and hasattr(api, "Event"):
        return StreamTransfer(spec, depth)
    return SyncTransfer(spec)


def shutdown(procs, conns, shms, views, locks) -> None:
    """Stop workers (politely, then by force), close pipes, unlink shared memory. Safe to call twice; runs from
    close(), garbage collection or interpreter exit via weakref.finalize."""
    for c in conns:
        try:
            c.send(Stop())
        except OSError:
            pass
    for p in procs:
        p.join(timeout=3)
        if p.is_alive():
            p.kill()  # a worker stuck in a decode; its state is of no further use
            p.join(timeout=3)
    for c in conns:
        c.close()
    views.clear()
    for s in shms:
        try:
            s.close()
        except BufferError:
            pass  # a caller still holds a view of the slot; unlinking below frees the memory once it drops it
        try:
            s.unlink()
        except FileNotFoundError:
            pass
    for fd in locks:
        if fd is not None:
            os.close(fd)
    procs.clear(), conns.clear(), shms.clear(), locks.clear()


def lock_segment(name: str) -> int | None:
    """Holds a lock on the slot `name` for as long as the descriptor returned stays open (the loader's life): the
    kernel drops it with the process, so an unlocked slot has no owner. None where slots are not files (no
    /dev/shm)."""
    try:
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDONLY)
    except OSError:
        return None
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a slot made an instant ago: nobody else locks it
    return fd


def unlink_stale_segments() -> list[str]:
    """Remove slots of loaders that died together with their resource tracker (a kill -9 of the whole process
    group, an out-of-memory kill), which nothing else would ever clean up: those whose owner's lock is gone
    (`lock_segment`), which holds across PID namespaces and reused pids. A slot younger than FRESH_SEGMENT_S may be
    between its creation and its owner's lock, and stays. Unlinking never disturbs a mapping that exists. Returns
    the names removed."""
    removed = []
    if not os.path.isdir(SHM_DIR):
        return removed
    for name in os.listdir(SHM_DIR):
        if SHM_NAME.match(name) is None:
            continue
        path = os.path.join(SHM_DIR, name)
        try:
            if time.time() - os.stat(path).st_mtime < FRESH_SEGMENT_S:
                continue
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # gone meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(path)
            removed.append(name)
        except OSError:
            pass  # its owner lives
        finally:
            os.close(fd)
    return removed


def check_shm_space(needed: int) -> None:
    """Fail with a clear line instead of a SIGBUS in a worker when /dev/shm is small (Docker's default is 64 MB)."""
    if not os.path.isdir(SHM_DIR):
        return
    st = os.statvfs(SHM_DIR)
    free = st.f_bavail * st.f_frsize
    if free < needed:
        raise PipelineError(f"host loader needs {needed / 2**20:.0f} MiB of /dev/shm, {free / 2**20:.0f} MiB free; "
                           f"give the container more (docker --shm-size) or lower batch size / workers")


def usable_cores() -> int:
    """The cores this process may run on (a container's or taskset's limit, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def workers_note(asked: int, started: int, steps: int, cores: int) -> str | None:
    """One line where the decode processes are not what --workers says: fewer started (an epoch of `steps`
    batches keeps no more busy), or more than the cores. Those are started as asked, as PyTorch's DataLoader does
    (it warns too): a user may mean it, say for shards on slow storage; the line says what it costs."""
    said = []
    if started < asked:
        said.append(f"{started} decode processes started, one per batch of an epoch of {steps} (more would get "
                    f"no batch)")
    if started > cores:
        said.append(f"{started} processes on {cores} core{'s' * (cores > 1)} take turns: those beyond the cores add "
                    f"memory, not speed")
    return f"host: --workers {asked}: " + "; ".join(said) if said else None


class HostLoader(ShardLoader):
    def __init__(self, spec: LoaderSpec):
        self.opts = spec.backend_options(HostOptions)
        super().__init__(spec, "host")
        # Workers beyond `steps` would get no batches (pipeline/plan.py rule 5), so don't start them.
        self.num_workers = max(1, min(spec.workers, self.steps))
        self._procs, self._conns, self._shms, self._views, self._locks = [], [], [], [], []
        self._finalizer = weakref.finalize(self, shutdown, self._procs, self._conns, self._shms, self._views,
                                           self._locks)
        self._start_workers(self.manifest.num_classes)
        self.transfer = make_transfer(spec, depth=max(1, spec.prefetch) + 1)

    def _start_workers(self, num_classes) -> None:
        spec, slots = self.spec, self.opts.slots_per_worker
        nbytes = slot_nbytes(spec.batch_size, spec.img_size)
        unlink_stale_segments()
        own_temp_folder()
        check_shm_space(self.num_workers * slots * nbytes)
        token = secrets.token_hex(4)
        ctx = mp.get_context(self.opts.start_method)
        if self.opts.start_method == "forkserver":
            # The server imports the worker module once; each worker forks from it instead of re-importing.
            ctx.set_forkserver_preload(["pipeline.host_worker"])
        with stop_signals_blocked():  # the forkserver and resource tracker start in here, the first time
            self._start_processes(ctx, nbytes, slots, num_classes, token)

    def _start_processes(self, ctx, nbytes: int, slots: int, num_classes, token: str) -> None:
        spec = self.spec
        for w in range(self.num_workers):
            names = []
            for k in range(slots):
                name = f"vitpipe_{os.getpid()}_{token}_{w}_{k}"
                shm = shared_memory.SharedMemory(name=name, create=True, size=nbytes)
                self._shms.append(shm)
                self._locks.append(lock_segment(shm.name))
                names.append(shm.name)
            self._views.append({side: [slot_arrays(s.buf, spec.batch_size, side) for s in self._shms[-slots:]]
                                for side in spec.sides})  # each side has its views of the slots
            cfg = WorkerConfig(
                worker=w, num_workers=self.num_workers, planner=self.planner, transform=spec.transform,
                skip_bad=spec.on_error == "skip", num_classes=num_classes, slot_names=tuple(names),
                environment=tuple(storage.environment().items()), part=spec.part,
                decoder=self.opts.resolved_decoder, schedule=spec.res_schedule if spec.train else None,
                resized=tuple(spec.transform_at(side) for side in spec.sides if side != spec.img_size))
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(cfg, child_end), name=f"host-worker-{w}", daemon=True)
            with main_not_replayed(), one_thread_each():  # no main guard needed in the user's script
                proc.start()
            child_end.close()  # only the worker holds its end now, so our exit reads as EOF there
            self._procs.append(proc)
            self._conns.append(parent_end)

    def describe(self) -> str:
        s = self.spec
        return (f"host: {self.num_workers} worker processes ({self.opts.start_method}), decoder "
                f"{self.opts.resolved_decoder}, {pillow_flavour()}, "
                f"{self.opts.slots_per_worker} shm slots of {s.batch_size}x{s.img_size}x{s.img_size}x3 uint8 "
                f"per worker, prefetch {s.prefetch} -> {s.device}, augment {s.transform.augment.describe()}"
                f"{s.repeats_note}")

    def notes(self) -> list[str]:
        notes = []
        if not pillow_is_simd():
            # Pillow-SIMD is its own distribution: a later `pip install` of anything that needs pillow silently puts
            # stock Pillow back, and the resizes here run much slower (docs/pipeline.md, "Pillow flavours").
            notes.append(f"host: {pillow_flavour()} resizes the crops, not Pillow-SIMD (a later pip install of a "
                         f"package needing pillow replaces it); bash tools/install_pillow_simd.sh puts it back")
        if self.spec.transform.augment.active and not KERNELS_BUILT:
            notes.append("host: the augmentation kernels (pipeline/_augment.c) are not built: --aa runs through "
                         "Pillow, several times slower; a C compiler and tools/setup.sh build them")
        workers = workers_note(self.spec.workers, self.num_workers, self.steps, usable_cores())
        return notes + ([workers] if workers else [])

    def close(self) -> None:
        self._finalizer()
        self.run.stop()

    def __iter__(self):
        if not self._finalizer.alive:
            raise RuntimeError("this HostLoader is closed")
        return super().__iter__()

    # -- the run (pipeline/shard_loader.py) --------------------------------------------------------------------------
    def start_run(self, position) -> None:
        for conn in self._conns:
            conn.send(StartRun(self.run.number, position.epoch, position.local, position.stages))

    def ahead(self) -> int:
        return max(1, self.spec.prefetch)

    def take(self, k: int, index: int, epoch: int):
        """Wait for batch `index` of `epoch` (this loader's k-th of it), start its transfer, give the slot back."""
        worker = worker_of(k, self.num_workers)
        slot = self._receive(worker, index, self.run.number, epoch)
        images, labels = self._views[worker][self.side_at(epoch)][slot]
        pending = self.transfer.start(images, labels)
        try:
            self._conns[worker].send(Release(self.run.number, slot))
        except OSError:
            pass  # the worker is gone; the next wait on it reports why
        return pending

    def finish(self, taken):
        return self.transfer.finish(taken)

    def _receive(self, worker: int, batch_index: int, run: int, epoch: int) -> int:
        conn, timeout = self._conns[worker], float(self.opts.timeout_s)
        sentinels = [p.sentinel for p in self._procs]
        while True:
            ready = connection.wait([conn, *sentinels], timeout=timeout)
            if not ready:
                raise WorkerError(f"host worker {worker} sent nothing for {timeout:.0f} s (hung decode? slow disk?)")
            if conn in ready or conn.poll():
                msg = self._recv(worker)
                if msg.run != run:
                    continue  # about an abandoned run
                if isinstance(msg, SampleFailed):
                    raise (SampleError if msg.one_sample else ShardError)(msg.text)
                if (msg.epoch, msg.index) != (epoch, batch_index):
                    raise WorkerError(f"host worker {worker} sent batch {msg.index} of run epoch {msg.epoch}, "
                                      f"expected {batch_index} of {epoch}")
                self._account(msg.bytes_read, msg.skipped)
                return msg.slot
            self._raise_for_dead()

    def _recv(self, worker: int):
        try:
            msg = self._conns[worker].recv()
        except (EOFError, OSError):
            self._procs[worker].join(timeout=1)
            raise WorkerError(f"host worker {worker} exited (code {self._procs[worker].exitcode}) mid-epoch")
        if isinstance(msg, Crashed):
            raise WorkerError(msg.text)
        return msg

    def _raise_for_dead(self) -> None:
        for w, p in enumerate(self._procs):
            if p.is_alive():
                continue
            while self._conns[w].poll():  # its last words, if it managed to send them
                self._recv(w)
            raise WorkerError(f"host worker {w} (pid {p.pid}) died with exit code {p.exitcode}")

    def _account(self, nbytes: int, skipped: dict[str, int]) -> None:
        self.bytes_read += nbytes
        for name, count in skipped.items():
            self.skipped_shards[name] = self.skipped_shards.get(name, 0) + count
