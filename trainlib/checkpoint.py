"""Training checkpoints: written atomically, loadable by timm, resumable exactly.

A checkpoint is a dict that `torch.load(weights_only=True)` accepts (tensors, numbers, strings, lists, dicts only),
so timm's `load_checkpoint`/`create_model(checkpoint_path=...)` can read it: the weights sit under "model" (the
unwrapped, un-compiled module's state dict), beside "optimizer", "scaler", "scheduler", "epoch" (the epoch to run
next, or the one in progress), "step_in_epoch" (steps of that epoch already done), "global_step", "best_acc1",
"config" and "rng" (one entry per rank: python, numpy, torch and device generator states).
"""
from __future__ import annotations

import errno
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from pipeline.shards import atomicio

LAST, BEST = "last.pth", "best.pth"


def python_state(generator=random) -> list:
    """A python generator's state (the module's, or a `random.Random`'s) in weights_only-loadable types."""
    version, internal, gauss = generator.getstate()
    return [version, list(internal), gauss]


def set_python_state(state: list, generator=random) -> None:
    version, internal, gauss = state
    generator.setstate((version, tuple(internal), gauss))


def numpy_state(generator=np.random) -> list:
    """A numpy generator's state (the global one's, or a `RandomState`'s); its key array becomes a tensor."""
    kind, keys, pos, has_gauss, gauss = generator.get_state()
    return [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]


def set_numpy_state(state: list, generator=np.random) -> None:
    kind, keys, pos, has_gauss, gauss = state
    generator.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def rng_state(device) -> dict:
    """This process's generator states, in weights_only-loadable types."""
    return {"python": python_state(), "numpy": numpy_state(), "torch": torch.get_rng_state(),
            "device": device.rng_state()}


def set_rng_state(state: dict, device) -> None:
    set_python_state(state["python"])
    set_numpy_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    device.set_rng_state(state["device"])


def save(path: Path, state: dict) -> None:
    """torch.save under a temporary name in the same folder, then rename: a crash mid-write leaves the previous
    file intact. A full disk is one CheckpointError line saying how much space is there and how much is needed."""
    path = Path(path)
    tmp = atomicio.temp_path(path)
    try:
        torch.save(state, tmp)
        atomicio.finish_temp(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        need, free = tensor_bytes(state), shutil.disk_usage(path.parent).free
        # torch's zip writer reports a full disk as a RuntimeError ("unexpected pos ..."), not as ENOSPC.
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or (isinstance(e, RuntimeError) and free < need):
            raise CheckpointError(f"{path}: no space left on device ({free / 2**20:.0f} MiB free there, the "
                                  f"checkpoint needs about {need / 2**20:.0f} MiB); the previous {path.name}, if "
                                  f"any, is intact") from None
        raise


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in a (nested) checkpoint dict: about what torch.save writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Temporary checkpoint files (`.<name>.<pid>.tmp`) of writers that no longer run: a process killed while saving
    leaves one behind. A live writer's file is kept."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp") if Path(folder).is_dir() else ():
        if not atomicio.is_temp_name(tmp.name):
            continue
        pid = int(tmp.name.rsplit(".", 2)[-2])
        try:
            os.kill(pid, 0)
            continue  # alive (or another user's): not ours to remove
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def copy_as(src: Path, dst: Path) -> None:
    """Make `dst` a copy of the finished file `src`, atomically. A hard link costs nothing and survives `src` being
    replaced later (the link keeps the old inode); file systems without links get a byte copy."""
    tmp = atomicio.temp_path(Path(dst))
    try:
        os.link(src, tmp)
    except OSError:
        atomicio.write_bytes(tmp, Path(src).read_bytes(), fsync=False)
    atomicio.finish_temp(tmp, Path(dst))


class CheckpointError(ValueError):
    """A --resume file that is not a training checkpoint of ours; the message names it."""


def load(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint here")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling fails in many ways; all mean "not a readable checkpoint"
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(state, dict) or "model" not in state or "global_step" not in state:
        raise CheckpointError(f"{path}: not a training checkpoint written by train.py (no 'model'/'global_step'); "
                         f"use --pretrained for plain weights")
    return state


def resolve_resume(resume: str | None, output: str | Path) -> Path | None:
    """--resume PATH, or 'auto' = <output>/last.pth when a previous run left one (a fresh start otherwise)."""
    if not resume:
        return None
    if resume == "auto":
        last = Path(output) / LAST
        return last if last.is_file() else None
    return Path(resume)
