"""The host backend on tiny shard sets: batch form, labels, coverage across ranks, val padding, epochs, error policy,
and that no worker process or shared-memory segment outlives a loader."""
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from collections import Counter
from pathlib import Path

import make_shards
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import build_loader
from pipeline.host import HostOptions, WorkerError
from pipeline.resolution import ResSchedule
from pipeline.shards.errors import PipelineError, SampleError, ShardError
from pipeline.shards.format import read_manifest, shard_list

ROOT = Path(__file__).resolve().parent.parent
LEVELS = (30, 95, 160, 225)  # per-channel colour levels; 4**3 = 64 distinguishable samples
SIZE = 16  # output side: small keeps the tests fast; still exercises draft() on the larger sources


def colour_of(sample_id: int) -> tuple[int, int, int]:
    return LEVELS[sample_id // 16], LEVELS[sample_id // 4 % 4], LEVELS[sample_id % 4]


def id_of(image_u8: torch.Tensor) -> int:
    """A solid-colour sample survives any crop, resize and flip, so its mean colour names it."""
    mean = image_u8.float().mean(dim=(1, 2)).tolist()
    digits = [min(range(4), key=lambda k: abs(LEVELS[k] - m)) for m in mean]
    return digits[0] * 16 + digits[1] * 4 + digits[2]


@pytest.fixture(scope="session")
def colour_shards(tmp_path_factory) -> Path:
    """64 solid-colour JPEGs (4 classes; 12 train + 4 val each) of varied sizes, sharded by tools/make_shards.py
    with 10 samples per shard."""
    src = tmp_path_factory.mktemp("colours") / "folder"
    n = 0
    for split, per_class in (("train", 12), ("val", 4)):
        for c in range(4):
            d = src / split / f"class{c}"
            d.mkdir(parents=True)
            for k in range(per_class):
                size = (40 + 7 * (n % 8), 90 - 5 * (n % 9))
                Image.new("RGB", size, colour_of(n)).save(d / f"img{n:02d}.jpg", quality=95)
                n += 1
    out = src.parent / "shards"
    assert make_shards.main(["--data_path", str(src), "--out", str(out), "--samples-per-shard", "10",
                             "--workers", "1"]) == 0
    return out


def truth(data_path: Path, split: str) -> dict[str, int]:
    """key -> label, read straight from the tars."""
    labels = {}
    for shard in shard_list(data_path, split):
        with tarfile.open(shard.path) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".cls"):
                    labels[m.name[:-4]] = int(tf.extractfile(m).read())
    return labels


def loader(data_path, split="train", **kw):
    args = dict(batch_size=4, device="cpu", workers=2, img_size=SIZE, backend="host")
    return build_loader(data_path=data_path, split=split, **{**args, **kw})


def ids_and_labels(batches):
    ids, labels = [], []
    for images, y in batches:
        ids += [id_of(img) if lab >= 0 else -1 for img, lab in zip(images, y)]
        labels += y.tolist()
    return ids, labels


def gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split()[2] == "Z":  # a zombie is dead; its reaper just hasn't run yet
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def worker_pids(l) -> list[int]:
    return [p.pid for p in l._procs]


def skipped(l) -> int:
    """Corrupt samples replaced so far, all shards."""
    return sum(l.skipped_shards.values())


def shm_names(l) -> list[str]:
    return [s.name for s in l._shms]


def assert_cleaned(pids, names):
    assert all(gone(p) for p in pids), "a worker process outlived its loader"
    assert not [n for n in names if os.path.exists(f"/dev/shm/{n}")], "shared memory left in /dev/shm"


def test_batches_are_normalized_nchw_with_manifest_labels(sample_shards):
    with loader(sample_shards) as l:
        assert "Pillow" in l.describe()
        batches = list(l)
        assert len(batches) == len(l) == 48 // 4
        assert l.bytes_read > 0
    images, labels = batches[0]
    assert images.shape == (4, 3, SIZE, SIZE) and images.dtype == torch.float32 and images.is_contiguous()
    assert -1.0 <= images.min() < 0 < images.max() <= 1.0
    assert labels.dtype == torch.int64
    seen = Counter(y for _, ys in batches for y in ys.tolist())
    assert seen == Counter(truth(sample_shards, "train").values())
    assert len(seen) == read_manifest(sample_shards).num_classes


def test_uint8_channels_last_batches_are_copies_of_the_slots(colour_shards):
    with loader(colour_shards, split="val", dtype=torch.uint8, channels_last=True, workers=1) as l:
        batches = list(l)
    images, _ = batches[0]  # the loader's shared memory is gone; the batch must not have been a view of it
    assert images.dtype == torch.uint8 and images.shape == (4, 3, SIZE, SIZE)
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert id_of(images[0]) in range(64)


def test_two_ranks_cover_each_train_sample_once(colour_shards):
    ids = []
    for rank in (0, 1):
        with loader(colour_shards, rank=rank, world_size=2, dtype=torch.uint8) as l:
            assert len(l) == 48 // (2 * 4)
            rank_ids, labels = ids_and_labels(l)
        ids += rank_ids
        assert all(i // 12 == y for i, y in zip(rank_ids, labels)), "label must travel with its image"
    assert sorted(ids) == list(range(48))


def test_repeated_augmentation_reads_a_third_of_the_samples_three_times_each_on_three_ranks(colour_shards):
    ids = []
    for rank in range(3):
        with loader(colour_shards, rank=rank, world_size=3, dtype=torch.uint8, workers=1, aug_repeats=3) as l:
            assert len(l) == 48 // 3 // 4  # U: 16 samples; E: 48 positions, 16 a rank
            assert "3 augmented copies" in l.describe()
            rank_ids, labels = ids_and_labels(l)
        assert len(set(rank_ids)) == len(rank_ids) == 16, "the copies of a sample are on different ranks"
        assert all(i // 12 == y for i, y in zip(rank_ids, labels)), "label must travel with its image"
        ids += rank_ids
    assert sorted(Counter(ids).values()) == [3] * 16
    with pytest.raises(ValueError, match="aug_repeats must be >= 1"):
        loader(colour_shards, aug_repeats=0)


def test_val_is_exact_with_minus_one_padding(colour_shards):
    ids, labels = [], []
    for rank in (0, 1):
        with loader(colour_shards, split="val", batch_size=3, rank=rank, world_size=2, dtype=torch.uint8) as l:
            assert len(l) == 3  # 8 samples per rank in batches of 3: 9 slots, 1 padding
            batches = list(l)
        images = torch.cat([b[0] for b in batches])
        labels_here = torch.cat([b[1] for b in batches])
        assert (labels_here == -1).sum() == 1 and (images[labels_here == -1] == 0).all()
        rank_ids, rank_labels = ids_and_labels(batches)
        ids += rank_ids
        labels += rank_labels
    assert sorted(i for i in ids if i >= 0) == list(range(48, 64))
    assert Counter(labels) == Counter({0: 4, 1: 4, 2: 4, 3: 4, -1: 2})


def test_epochs_follow_each_other_reshuffled_and_set_epoch_replays_one_exactly(colour_shards):
    with loader(colour_shards, dtype=torch.uint8) as l:
        first = [b[0].clone() for b in l]
        assert l.epoch == 1  # an epoch iterated to its end moves on by itself
        second = [b[0].clone() for b in l]
        l.set_epoch(0)
        again = [b[0] for b in l]
    assert all(torch.equal(a, b) for a, b in zip(first, again)), "same seed and epoch: same batches"
    order = lambda batches: [id_of(img) for b in batches for img in b]  # noqa: E731
    assert order(first) != order(second) and sorted(order(first)) == sorted(order(second))


def test_an_abandoned_epoch_goes_on_where_it_stopped(colour_shards):
    with loader(colour_shards, dtype=torch.uint8) as l:
        taken = [(b.images.clone(), b.labels) for _, b in zip(range(2), l)]
        assert l.state_dict()["batch"] == 2 and len(l) == 12
        rest = [(b.images.clone(), b.labels) for b in l]
        with loader(colour_shards, dtype=torch.uint8) as whole:
            expected = [b.images.clone() for b in whole]
    assert len(rest) == 10 and all(torch.equal(a, b) for (a, _), b in zip(taken + rest, expected))
    ids, _ = ids_and_labels(taken + rest)
    assert sorted(ids) == list(range(48))


def test_workers_run_on_into_the_next_epoch(colour_shards):
    with loader(colour_shards, dtype=torch.uint8, workers=2) as l:
        l.set_epoch(0)
        epoch0 = [b[0].clone() for b in l]
        # Unasked, each worker makes the next epoch's first batch (as far as its free slots go)...
        assert all(conn.poll(timeout=30) for conn in l._conns)
        gen = l.run.number
        l.set_epoch(1)
        epoch1 = [b[0].clone() for b in l]
        assert l.run.number == gen, "epoch 1 followed on: the workers were not restarted"
        l.set_epoch(5)  # ...and a jump restarts them at the epoch asked for
        epoch5 = [b[0].clone() for b in l]
        assert l.run.number == gen + 1
    with loader(colour_shards, dtype=torch.uint8, workers=3) as fresh:  # batches do not depend on the worker count
        for epoch, seen in ((1, epoch1), (5, epoch5)):
            fresh.set_epoch(epoch)
            assert all(torch.equal(a, b) for a, (b, _) in zip(seen, fresh)) and len(seen) == len(fresh)
    assert not all(torch.equal(a, b) for a, b in zip(epoch0, epoch1))


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the workers' environment from /proc")
def test_workers_start_with_one_thread_each_and_the_parent_keeps_its_environment(colour_shards, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    for start_method in ("forkserver", "spawn"):
        with loader(colour_shards, dtype=torch.uint8, workers=2,
                    options=HostOptions(start_method=start_method)) as l:
            next(iter(l))
            for pid in worker_pids(l):
                # The environment a process started with; numpy sized its BLAS pool from it as it loaded.
                env = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0")
                           if "=" in item)
                assert env["OMP_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "1"
        assert os.environ["OMP_NUM_THREADS"] == "7" and "OPENBLAS_NUM_THREADS" not in os.environ


def test_a_newer_iteration_replaces_an_older_one_and_goes_on(colour_shards):
    with loader(colour_shards, dtype=torch.uint8, workers=2) as l:
        old = iter(l)
        next(old)
        new = iter(l)
        first = next(new)[0].clone()  # from where the loader stands, batch 1: a new run
        with pytest.raises(RuntimeError, match="a newer iteration over this HostLoader replaced this one"):
            next(old)
        rest = [b[0].clone() for b in new]  # the newer one is unharmed
        assert len(rest) == len(l) - 2
        l.set_epoch(0)
        again = [b[0].clone() for b in l]
        assert torch.equal(again[1], first) and all(torch.equal(a, b) for a, b in zip(again[2:], rest))


@pytest.mark.parametrize("backend", ["host", "dali"])
def test_a_script_without_a_main_guard_works(colour_shards, tmp_path, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    script = tmp_path / "quick.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        import torch
        from pipeline import build_loader
        print("top level ran", flush=True)
        loader = build_loader(data_path=sys.argv[1], backend="{backend}", batch_size=4, device="cpu", workers=2,
                              img_size=16, dtype=torch.uint8)
        print("samples", sum(len(y) for _, y in loader), flush=True)
        loader.close()
    """))
    proc = subprocess.run([sys.executable, str(script), str(colour_shards)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ["top level ran", "samples 48"]  # the workers did not run the script again


def test_killed_worker_raises_quickly_and_cleans_up(colour_shards):
    l = loader(colour_shards, workers=1, batch_size=2)
    pids, names = worker_pids(l), shm_names(l)
    it = iter(l)
    next(it)
    os.kill(pids[0], signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(WorkerError, match="host worker 0"):
        for _ in it:
            pass
    assert time.monotonic() - start < 5
    assert_cleaned(pids, names)


def corrupted_copy(src: Path, dst: Path, split: str, how: str) -> str:
    """Copy the shard set and spoil the first sample of the split's first shard in place; return its key."""
    shutil.copytree(src, dst)
    shard = shard_list(dst, split)[0]
    first = Path(shard.index_path).read_text().splitlines()[1].split()
    parts = {first[i]: (int(first[i + 1]), int(first[i + 2]), first[i + 3]) for i in range(0, len(first), 4)}
    offset, size, name = parts["jpg" if how == "jpg" else "cls"]
    with open(shard.path, "r+b") as f:
        f.seek(offset)
        f.write(b"\x00" * size if how == "jpg" else b"x" * size)
    if how == "idx":
        Path(shard.index_path).write_text("v1.2 3\nnonsense\n")
    return name.rsplit(".", 1)[0]


@pytest.mark.parametrize("how", ["jpg", "cls"])
def test_corrupt_sample_raises_naming_shard_and_key(colour_shards, tmp_path, how):
    key = corrupted_copy(colour_shards, tmp_path / "bad", "val", how)
    l = loader(tmp_path / "bad", split="val")
    pids, names = worker_pids(l), shm_names(l)
    with pytest.raises(SampleError, match=rf"val-000000\.tar: sample {key}:"):
        list(l)
    assert_cleaned(pids, names)


@pytest.mark.parametrize("backend", ["host", "dali"])
def test_the_loaders_processes_outlive_a_stop_signal_to_the_group(colour_shards, backend):
    """SIGTERM and SIGUSR1 to every process a loader started (what a signal to the process group does to them: its
    workers, the forkserver, the resource tracker, DALI's readers): the loader reads on, two whole epochs."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    script = textwrap.dedent(f"""
        import os, signal, subprocess, sys
        from pipeline import build_loader
        with build_loader(data_path={str(colour_shards)!r}, split="train", batch_size=4, device="cpu", workers=2,
                          img_size=16, backend={backend!r}) as loader:
            loader.set_epoch(0)
            first = sum(len(y) for _, y in loader)
            kids = subprocess.run(["pgrep", "-P", str(os.getpid())], capture_output=True, text=True).stdout.split()
            assert kids, "no processes started"
            for pid in map(int, kids):
                for sig in (signal.SIGTERM, signal.SIGUSR1):
                    os.kill(pid, sig)
            loader.set_epoch(1)
            second = sum(len(y) for _, y in loader)
        print("epochs", first, second, "signalled", len(kids))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[:3] == ["epochs", "48", "48"], proc.stdout


def test_a_truncated_shard_is_refused_at_the_start_or_skipped_whole(colour_shards, tmp_path):
    shutil.copytree(colour_shards, tmp_path / "cut")
    shard = shard_list(tmp_path / "cut", "train")[2]
    os.truncate(shard.path, Path(shard.path).stat().st_size // 2)
    with pytest.raises(ShardError, match=r"train-000002\.tar: \d+ bytes, the manifest says \d+: not the shard this "
                                         r"set was made with \(replaced or cut short\)") as e:
        loader(tmp_path / "cut")  # before any worker starts, before a sample is trained on
    assert "\n" not in str(e.value)
    with loader(tmp_path / "cut", on_error="skip") as l:
        assert len(list(l)) == 12
        assert l.skipped_shards == {"train-000002.tar": shard.num_samples}  # every sample of it, none read


def test_skip_mode_counts_and_keeps_batch_shape(colour_shards, tmp_path):
    corrupted_copy(colour_shards, tmp_path / "bad", "train", "jpg")
    with loader(tmp_path / "bad", on_error="skip", dtype=torch.uint8) as l:
        batches = list(l)
        assert skipped(l) == 1
    assert len(batches) == 12 and all(b[0].shape == (4, 3, SIZE, SIZE) for b in batches)
    assert all(b[1].min() >= 0 for b in batches)


def test_skip_mode_keeps_val_exact(colour_shards, tmp_path):
    key = corrupted_copy(colour_shards, tmp_path / "bad", "val", "jpg")
    with loader(tmp_path / "bad", split="val", on_error="skip", dtype=torch.uint8) as l:
        batches = list(l)
        assert skipped(l) == 1
    ids, labels = ids_and_labels(batches)
    good = truth(colour_shards, "val")
    del good[key]
    # The bad sample became padding: every other val sample counted once, none twice.
    assert Counter(label for label in labels if label >= 0) == Counter(good.values())
    assert len([i for i in ids if i >= 0]) == len(set(i for i in ids if i >= 0)) == len(good)


def test_a_broken_index_is_one_line_naming_it(colour_shards, tmp_path):
    corrupted_copy(colour_shards, tmp_path / "bad", "val", "idx")
    l = loader(tmp_path / "bad", split="val", workers=1)
    pids, names = worker_pids(l), shm_names(l)
    with pytest.raises(ShardError, match=r"val-000000\.idx:2: expected groups of") as e:
        list(l)
    assert "\n" not in str(e.value) and not isinstance(e.value, SampleError)
    assert_cleaned(pids, names)


def test_close_and_garbage_collection_leave_nothing_behind(colour_shards):
    l = loader(colour_shards)
    pids, names = worker_pids(l), shm_names(l)
    list(l)
    l.close()
    assert_cleaned(pids, names)
    with pytest.raises(RuntimeError, match="closed"):
        iter(l).__next__()

    l = loader(colour_shards)
    pids, names = worker_pids(l), shm_names(l)
    it = iter(l)
    next(it)
    del l, it  # abandoned mid-epoch: the finalizer must still stop the workers
    assert_cleaned(pids, names)


DYING_PARENT = textwrap.dedent("""
    import os, signal, sys
    from pipeline import build_loader
    if __name__ == "__main__":
        # Ctrl-C as in a terminal, even where the tests run as a shell's background job: such a job starts with SIGINT
        # ignored, and Python keeps an inherited SIG_IGN (the signal would then be lost, and the script end well).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        l = build_loader(data_path=sys.argv[1], split="train", backend="host", batch_size=2, device="cpu",
                         workers=2, img_size=16)
        print(" ".join(map(str, (p.pid for p in l._procs))), " ".join(s.name for s in l._shms), flush=True)
        it = iter(l)
        next(it)
        os.kill(os.getpid(), getattr(signal, sys.argv[2]))
        for _ in it:
            pass
""")


@pytest.mark.parametrize("sig", ["SIGINT", "SIGKILL"])
def test_parent_interrupted_or_killed_leaves_no_orphans(colour_shards, sig):
    proc = subprocess.run([sys.executable, "-c", DYING_PARENT, str(colour_shards), sig], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0, proc.stderr
    first = proc.stdout.splitlines()[0].split()
    pids, names = [int(p) for p in first[:2]], first[2:]
    if sig == "SIGINT":
        assert "KeyboardInterrupt" in proc.stderr and "host worker" not in proc.stderr
    # After SIGKILL nobody runs our cleanup: workers see EOF on their pipe, the resource tracker unlinks the memory.
    assert_cleaned(pids, names)


HOLDING_PARENT = textwrap.dedent("""
    import sys, time
    from pipeline import build_loader
    if __name__ == "__main__":
        l = build_loader(data_path=sys.argv[1], split="train", backend="host", batch_size=2, device="cpu",
                         workers=2, img_size=16)
        next(iter(l))
        print(" ".join(s.name for s in l._shms), flush=True)
        time.sleep(600)
""")


def test_the_next_loader_removes_the_slots_of_a_killed_process_group_but_not_a_live_loaders(colour_shards):
    """kill -9 of the whole group takes the resource tracker too, so nothing of the dead loader unlinks its slots;
    the next loader start on the machine does, by their owner's lock (not by pid), and leaves a live one's."""
    procs = [subprocess.Popen([sys.executable, "-c", HOLDING_PARENT, str(colour_shards)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, start_new_session=True) for _ in range(2)]
    try:
        dead, alive = (proc.stdout.readline().split() for proc in procs)
        os.killpg(procs[0].pid, signal.SIGKILL)
        procs[0].wait(timeout=30)
        assert len(dead) == 4 and all(os.path.exists(f"/dev/shm/{n}") for n in dead)  # what the kill left
        time.sleep(2.5)  # past FRESH_SEGMENT_S, the window between a slot's creation and its lock
        with loader(colour_shards, workers=1):
            assert not [n for n in dead if os.path.exists(f"/dev/shm/{n}")]
            assert all(os.path.exists(f"/dev/shm/{n}") for n in alive)
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)


def test_a_schedule_changes_the_side_at_epoch_boundaries_without_new_workers(sample_shards):
    """Each epoch's batches are those a loader fixed at that epoch's side makes (the same crops, seeded per batch),
    from the same worker processes, running on from one epoch into the next."""
    schedule = ResSchedule(16, 48, 0, 2, step=16)
    args = dict(dtype=torch.uint8, aa="rand-m9-mstd0.5", workers=2)
    with loader(sample_shards, img_size=48, res_schedule=schedule, **args) as ramp:
        pids, got = worker_pids(ramp), {}
        for epoch in range(3):
            ramp.set_epoch(epoch)
            got[epoch] = [x.clone() for x, _ in ramp]
        assert worker_pids(ramp) == pids
    assert [got[e][0].shape[-1] for e in range(3)] == [16, 32, 48]
    for epoch in range(3):
        with loader(sample_shards, img_size=schedule.size(epoch), **args) as fixed:
            fixed.set_epoch(epoch)
            assert all(torch.equal(a, b) for (b, _), a in zip(fixed, got[epoch], strict=True)), epoch


def test_decoder_matches_a_reference_resize(sample_shards):
    """Val crops equal Pillow's plain resize-then-center-crop up to resampling differences."""
    from pipeline.transforms import eval_resize

    with loader(sample_shards, split="val", workers=1, dtype=torch.uint8, batch_size=2, img_size=32) as l:
        images, labels = next(iter(l))
    shard = shard_list(sample_shards, "val")[0]
    with tarfile.open(shard.path) as tf:
        jpg = next(m for m in tf.getmembers() if m.name.endswith(".jpg"))
        im = Image.open(tf.extractfile(jpg)).convert("RGB")
    side = eval_resize(32, 0.9)
    w, h = im.size
    im = im.resize((round(w * side / min(w, h)), round(h * side / min(w, h))), Image.BICUBIC)
    left, top = (im.size[0] - 32) // 2, (im.size[1] - 32) // 2
    ref = torch.from_numpy(np.array(im.crop((left, top, left + 32, top + 32)))).permute(2, 0, 1).float()
    # draft() decodes these 64-96 px sources at half scale and the crop offsets differ by subpixels, so compare 8x8
    # block means, and require the right region to match far better than a mirrored one.
    pool = lambda x: torch.nn.functional.avg_pool2d(x[None].float(), 8)  # noqa: E731
    err = (pool(images[0]) - pool(ref)).abs().mean()
    assert err < 10 and err < (pool(images[0]) - pool(ref.flip(1))).abs().mean() / 2


@pytest.mark.gpu
def test_cuda_stream_transfer_matches_the_cpu_path(colour_shards):
    with loader(colour_shards, split="val", workers=1) as l:
        cpu = list(l)
    with loader(colour_shards, split="val", workers=1, device="cuda", prefetch=3) as l:
        gpu = [(x.cpu(), y.cpu()) for x, y in l]  # .cpu() on the consumer stream: waits on the loader's event
    assert len(cpu) == len(gpu)
    assert all(torch.allclose(a[0], b[0], atol=1e-6) and torch.equal(a[1], b[1]) for a, b in zip(cpu, gpu))


def test_a_worker_crash_is_one_line_naming_where_and_the_traceback_file():
    from pipeline.host_worker import crash_report
    try:
        {}["missing"]
    except KeyError as e:
        line = crash_report(3, e)
    assert "\n" not in line and line.startswith("host worker 3 (pid ") and "KeyError: 'missing'" in line
    assert " at test_host.py:" in line and "in test_a_worker_crash_is_one_line" in line
    path = line.split("traceback in ")[1]
    assert "Traceback (most recent call last)" in Path(path).read_text()
    os.unlink(path)
    assert issubclass(WorkerError, PipelineError)  # train.py prints such errors in one line, exit 1


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's malloc is what is tuned")
def test_a_worker_reuses_freed_memory_instead_of_fresh_pages(tmp_path):
    # 64 JPEGs of 44 KB a batch: the worker's read-ahead thread frees one batch's bytes and reads the next's. With
    # glibc's default thresholds that was ~1,000 fresh pages a batch here, each zero-filled by the kernel on first
    # touch (measured without keep_freed_memory_in_the_heap at the worker's start; 0-2 with it).
    noise = np.random.default_rng(0).integers(0, 256, (200, 240, 3), dtype=np.uint8)
    for split, count in (("train", 128), ("val", 1)):
        d = tmp_path / "src" / split / "class0"
        d.mkdir(parents=True)
        Image.fromarray(noise).save(d / "0.jpg", quality=90)
        for k in range(1, count):
            shutil.copy(d / "0.jpg", d / f"{k}.jpg")
    assert make_shards.main(["--data_path", str(tmp_path / "src"), "--out", str(tmp_path / "shards"),
                             "--samples-per-shard", "128", "--no-restart-markers", "--workers", "1"]) == 0
    with loader(tmp_path / "shards", batch_size=64, workers=1, dtype=torch.uint8) as l:
        pid, taken, faults = worker_pids(l)[0], 0, {}
        for epoch in range(20):
            l.set_epoch(epoch)
            for _ in l:
                taken += 1
                if taken in (10, 30):
                    with open(f"/proc/{pid}/stat") as f:
                        faults[taken] = int(f.read().rsplit(")", 1)[1].split()[7])  # minflt
    assert (faults[30] - faults[10]) / 20 < 50, faults


# -- the loader's state (pipeline/loader.py state_dict / load_state_dict) ----------------------------------------


def test_a_state_round_trip_resumes_the_same_batches_exactly(colour_shards, tmp_path):
    with loader(colour_shards, dtype=torch.uint8, seed=3) as first:
        first.set_epoch(1)
        taken = [b.images.clone() for _, b in zip(range(5), first)]
        torch.save(first.state_dict(), tmp_path / "state.pt")
        rest = [b.images.clone() for b in first]
    state = torch.load(tmp_path / "state.pt", weights_only=True)  # plain data
    assert (state["epoch"], state["batch"], state["world_size"], state["batch_size"]) == (1, 5, 1, 4)
    with loader(colour_shards, dtype=torch.uint8, seed=3) as resumed:
        resumed.load_state_dict(state)
        resumed.set_epoch(1)  # the saved epoch keeps the position
        assert len(resumed) == 12 and resumed.position.batch == 5
        again = [b.images.clone() for b in resumed]
        assert resumed.epoch == 2  # and then the next epoch, whole
        assert len(resumed) == 12 and len(taken) + len(again) == 12
    assert all(torch.equal(a, b) for a, b in zip(again, rest))


def sample_ids(loaders, steps=None) -> list[int]:
    """The samples the ranks' loaders hand out next, `steps` batches each (None: the rest of the epoch)."""
    ids = []
    for l in loaders:
        for _, b in zip(range(steps if steps is not None else len(l)), l):
            ids += [id_of(img) for img in b.images]
    return ids


@pytest.mark.parametrize("before, after", [(1, 2), (2, 1), (2, 3)])
def test_a_state_taken_on_n_ranks_goes_on_over_m_with_the_samples_not_read(colour_shards, before, after):
    """48 samples; each rank of the first layout hands out 2 batches of 4, then the state of rank 0 goes to every
    rank of the other layout: over them the rest of the epoch reads no sample twice, and leaves out fewer than a
    batch per rank of the new layout (plan.py rule 3's tail)."""
    ranks = [loader(colour_shards, dtype=torch.uint8, rank=r, world_size=before, workers=1, seed=5)
             for r in range(before)]
    try:
        for l in ranks:
            l.set_epoch(2)
        read = sample_ids(ranks, steps=2)
        state = ranks[0].state_dict()
    finally:
        for l in ranks:
            l.close()
    later = [loader(colour_shards, dtype=torch.uint8, rank=r, world_size=after, workers=1, seed=5)
             for r in range(after)]
    try:
        for l in later:
            l.load_state_dict(state)
        # The count goes on from the 2 batches handed out, as StatefulDataLoader's (and Lightning's) does.
        left = 48 - 8 * before
        assert {(l.position.batch, len(l)) for l in later} == {(2, 2 + left // (4 * after))}
        rest = sample_ids(later)
        assert {l.epoch for l in later} == {3} and {len(l) for l in later} == {12 // after}  # then whole epochs
    finally:
        for l in later:
            l.close()
    assert len(read) == 8 * before and not set(read) & set(rest) and len(set(rest)) == len(rest)
    left = 48 - len(read)
    assert len(rest) == left - left % (4 * after)  # all but the tail that cannot fill a batch on every rank
