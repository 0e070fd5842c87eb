"""Process-level settings the loaders need, kept apart from what they compute: how worker processes start without
replaying the user's script and with one thread each, and how freed batch memory stays in the heap."""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import glob
import multiprocessing.util
import os
import shutil
import signal
import sys
import tempfile
from multiprocessing import resource_tracker

# One thread per worker process: the parallelism is the processes; libraries that pool threads would oversubscribe.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


# What a scheduler or a terminal sends the whole process group to stop a job: the trainer stops at a step with a
# checkpoint (train.py), so the loaders' worker processes must outlive it until their loader ends them.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def leave_stop_signals_to_the_parent() -> None:
    """In a worker process: ignore the stop signals. It still ends when its loader says so, or when its parent is
    gone (the host workers: EOF on their pipe; DALI's: DALI ends them)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


# Marks the folder multiprocessing keeps this process's helper files in (`pymp-*`: the forkserver's socket). A kill
# -9 skips the exit code that removes it, so the next start of a loader removes marked folders whose owner is gone.
OWNER_MARK = "vitpipe.owner"
_owner_lock: int | None = None  # the mark's descriptor, held (with its lock) for the life of this process


def own_temp_folder() -> None:
    """Marks this process's multiprocessing folder as ours, after removing the marked folders of processes that
    died: the mark is a file locked with flock, and the kernel drops the lock with its last holder (the process, or
    a child it forked), so a mark whose lock can be taken belongs to nobody. Unmarked `pymp-*` folders are other
    programs' and stay."""
    global _owner_lock
    if _owner_lock is not None:  # done, by this process or the parent it was forked from (which holds the folder)
        return
    remove_stale_temp_folders()
    folder = multiprocessing.util.get_temp_dir()
    # Locked under a name of its own first: a cleaner never finds the mark unlocked.
    fd = os.open(os.path.join(folder, f".{OWNER_MARK}.{os.getpid()}"), os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.rename(os.path.join(folder, f".{OWNER_MARK}.{os.getpid()}"), os.path.join(folder, OWNER_MARK))
    _owner_lock = fd


def remove_stale_temp_folders() -> list[str]:
    """The marked `pymp-*` folders of dead processes, removed (what a kill -9 left): their paths."""
    removed = []
    for mark in glob.glob(os.path.join(tempfile.gettempdir(), "pymp-*", OWNER_MARK)):
        try:
            fd = os.open(mark, os.O_RDWR)
        except OSError:
            continue  # gone meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # its process, or a child of it, lives
        shutil.rmtree(os.path.dirname(mark), ignore_errors=True)
        os.close(fd)
        removed.append(os.path.dirname(mark))
    return removed


@contextlib.contextmanager
def stop_signals_blocked():
    """Start processes with the stop signals blocked: a process inherits the mask through fork and exec, so the
    helpers multiprocessing starts on the way (the forkserver, the resource tracker) and DALI's reader processes
    never take a signal meant for the trainer, from their first instruction on. The trainer gets any that came
    meanwhile when the block ends."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        # Started here if not yet: multiprocessing unblocks SIGINT and SIGTERM in this thread after starting it (it
        # ignores those two itself), so the block is made again after.
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def one_thread_each():
    """Start processes with the thread pools of numpy's BLAS (and OpenMP, MKL, numexpr) at one thread. A pool is
    sized when its library loads, and a worker's modules load numpy before any of its own code runs (a forkserver
    imports them once, for all the workers it forks), so the setting has to be in the environment the process
    starts with: it is set here while they start, and restored after (what it is worth: docs/pipeline.md, "The host
    backend")."""
    saved = {name: os.environ.get(name) for name in THREAD_ENV}
    os.environ.update({name: "1" for name in THREAD_ENV})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def main_not_replayed():
    """Start processes (spawn, forkserver) without them running the user's `__main__` again. multiprocessing hands a
    new interpreter the main script's path or module name, and the child runs it, unguarded top-level code included:
    a quick script without `if __name__ == "__main__":` would then build loaders inside every worker. Our workers'
    code lives in importable modules and needs nothing of the main script, so the main module's path and spec are
    hidden while the processes start, and restored after."""
    main = sys.modules.get("__main__")
    saved = {key: main.__dict__[key] for key in ("__file__", "__spec__") if main is not None and key in main.__dict__}
    try:
        if main is not None:
            main.__dict__.pop("__file__", None)
            main.__spec__ = None
        yield
    finally:
        if main is not None:
            main.__dict__.update(saved)


@functools.cache
def keep_freed_memory_in_the_heap() -> None:
    """glibc hands freed blocks of more than 128 KB back to the kernel (and trims a thread's heap when its top is
    free), so the next allocation is fresh pages that the kernel zero-fills on first touch. A float batch on the CPU
    is such a block (38.5 MB at 64 x 224 px), every batch; in a host worker, the shard bytes its read-ahead thread
    reads are (docs/pipeline.md, "Measured figures"). Raising glibc's mmap and trim thresholds keeps freed memory in
    the heap for the next batch, as jemalloc or tcmalloc would. Process-wide, once: on the first CPU batch, and at a
    host worker's start; nothing happens where there is no glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    mallopt(m_mmap_threshold, 1 << 30)
    mallopt(m_trim_threshold, 1 << 30)
