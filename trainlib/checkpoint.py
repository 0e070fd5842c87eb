"""Training checkpoints: written atomically, loadable by timm, resumable exactly.

A checkpoint is a dict that `torch.load(weights_only=True)` accepts (tensors, numbers, strings, lists, dicts only),
so timm's `load_checkpoint`/`create_model(checkpoint_path=...)` can read it: the weights sit under "model" (the
unwrapped, un-compiled module's state dict), beside "optimizer", "scaler", "scheduler", "epoch" (the epoch to run
next, or the one in progress), "step_in_epoch" (steps of that epoch already done), "global_step", "best_acc1",
"config" and "rng" (one entry per rank: python, numpy, torch and device generator states), "data" (the shard set it
trained on: trainlib.build.data_identity) and "digest" (the sha256 of everything else, which `load` checks).

Integrity: `load` refuses, in one line naming the file, a checkpoint whose contents no longer match its digest (bytes
changed on disk or in transfer) or whose weights hold NaN or inf. `previous.pth` is the `last.pth` the latest save
replaced (a hard link), so `--resume auto` has something to fall back to (`load_resume`).
"""
from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from pipeline.shards import atomicio

LAST, BEST, PREVIOUS = "last.pth", "best.pth", "previous.pth"
DIGEST = "digest"  # the key of the sha256 over the rest of the checkpoint (`digest`)


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


def save(path: Path, state: dict, previous: Path | None = None) -> None:
    """torch.save under a temporary name in the same folder, then rename: a crash mid-write leaves the previous
    file intact. The state's digest goes in with it (`DIGEST`). `previous`: first make it a hard link to the file that
    `path` is about to replace, before the write, so the disk holds no more checkpoints at the write's peak than
    without it. A full disk is one CheckpointError line saying how much space is there and how much is needed."""
    path = Path(path)
    if previous is not None and path.is_file():
        copy_as(path, previous)
    tmp = atomicio.temp_path(path)
    # One copy from the device: the digest and the write both read it (each would copy a device tensor again).
    state = on_cpu({k: v for k, v in state.items() if k != DIGEST})
    state[DIGEST] = digest(state)
    try:
        # Our own file object, not a path: on an error its `with` closes the file, whereas torch's own writer keeps
        # it open for as long as the exception's traceback lives, and an unlinked file that is still open keeps its
        # blocks, so the free space read below would not count them.
        with open(tmp, "wb") as f:
            torch.save(state, f)
        atomicio.finish_temp(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        need, free = tensor_bytes(state), shutil.disk_usage(path.parent).free
        # torch's zip writer reports a full disk as a RuntimeError ("unexpected pos ..."), the OSError as its context.
        if no_space(e) or (isinstance(e, RuntimeError) and free < need):
            raise CheckpointError(f"{path}: no space left on device ({free / 2**20:.0f} MiB free there, the "
                                  f"checkpoint needs about {need / 2**20:.0f} MiB); the previous {path.name}, if "
                                  f"any, is intact") from None
        raise


def on_cpu(obj):
    """A (nested) checkpoint dict with its tensors copied to the CPU, detached; other values as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {key: on_cpu(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [on_cpu(value) for value in obj] if isinstance(obj, list) else tuple(on_cpu(v) for v in obj)
    return obj


def no_space(error: BaseException | None) -> bool:
    """Whether `error`, or an error it was raised from or while handling, is ENOSPC."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def digest(state: dict) -> str:
    """sha256 over a checkpoint's contents but its digest: each tensor's dtype, shape and bytes, every other value's
    type and repr, in the dicts' order (which torch.save and torch.load keep). About 1.7 GB/s on one CPU core."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != DIGEST})
    return h.hexdigest()


def _feed(h, obj) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"tensor {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the bytes as they are: bf16 and fp8 too
    elif isinstance(obj, dict):
        h.update(f"dict {len(obj)}\n".encode())
        for key, value in obj.items():
            _feed(h, key)
            _feed(h, value)
    elif isinstance(obj, (list, tuple)):
        h.update(f"list {len(obj)}\n".encode())
        for value in obj:
            _feed(h, value)
    else:
        text = f"{type(obj).__name__} {obj!r}"
        h.update(f"{len(text)} {text}\n".encode())


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
    """A training checkpoint, checked: readable, of train.py, its digest (where it has one) and finite weights; else a
    CheckpointError naming the file."""
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
    recorded = state.get(DIGEST)
    if recorded is not None and digest(state) != recorded:
        raise CheckpointError(f"{path}: its contents do not match the digest saved with them (changed on disk or in "
                              f"transfer since it was written): not a checkpoint to resume or evaluate")
    for part in ("model", "model_ema"):
        weights = state.get(part)
        for name, t in weights.items() if isinstance(weights, dict) else ():
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t.float()).all():
                raise CheckpointError(f"{path}: {part} weight {name} holds NaN or inf: not a checkpoint to resume "
                                      f"or evaluate")
    return state


def load_resume(resume: str, path: Path) -> tuple[Path, dict, list[str]]:
    """(the file a run resumes from, its state, notes to print). --resume PATH: that file, or its CheckpointError.
    --resume auto: `path` (<output>/last.pth), and when it fails `load`'s checks, the first of previous.pth (the
    last.pth it replaced) and best.pth beside it that passes, with a note saying so; a CheckpointError when none
    does."""
    try:
        state = load(path)
        return path, state, unverified(path, state)
    except CheckpointError as e:
        if resume != "auto":
            raise
        failed = str(e)
    tried = []
    for name in (PREVIOUS, BEST):
        other = path.with_name(name)
        if not other.is_file():
            tried.append(f"no {name}")
            continue
        try:
            state = load(other)
        except CheckpointError:
            tried.append(f"{name} fails too")
            continue
        return other, state, [f"note: --resume auto: {failed}; resuming from {other} (epoch {state['epoch']}, "
                              f"global step {state['global_step']}) instead", *unverified(other, state)]
    raise CheckpointError(f"{failed}; --resume auto has no checkpoint to fall back to ({', '.join(tried)}): pass "
                          f"--resume with a good one, or another --output to start afresh")


def unverified(path: Path, state: dict) -> list[str]:
    if DIGEST in state:
        return []
    return [f"note: {path} carries no digest (written before checkpoints had one): its bytes could not be "
            f"verified, only that its weights are finite"]


def resolve_resume(resume: str | None, output: str | Path) -> Path | None:
    """--resume PATH, or 'auto' = <output>/last.pth when a previous run left one (a fresh start otherwise)."""
    if not resume:
        return None
    if resume == "auto":
        last = Path(output) / LAST
        return last if last.is_file() else None
    return Path(resume)
