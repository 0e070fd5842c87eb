"""pipeline/dali.py on CPU operators: labels, the rank split, val padding, errors, parity with the host backend, and
the train augmentation (--aa, --color-jitter).

Every test but the missing-DALI ones skips when DALI is not installed. The shard sets are written here with
`tarfile` in make_shards' format (tar + wds2idx v1.2 index + manifest) so each test controls labels and sizes.
"""
import hashlib
import io
import itertools
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import build_loader
from pipeline.dali import DaliMissingError, DaliOptions
from pipeline.host import HostOptions
from pipeline.plan import epoch_order, rank_plan, rank_span
from pipeline.resolution import ResSchedule
from pipeline.shards.errors import ShardError
from pipeline.shards.format import (Manifest, Settings, ShardInfo, SplitInfo, index_line, index_text, shard_list,
                                    shard_name, write_set_files)

NUM_LABELLED, PER_SHARD = 1000, 130  # labels 0..999, shards of uneven size (7 x 130 + 90)


def jpeg(pixels: np.ndarray, quality: int = 95) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=quality)
    return out.getvalue()


def write_split(dst, split: str, samples: list, per_shard: int) -> SplitInfo:
    """samples: (key, jpg bytes, cls bytes). Writes `<split>-NNNNNN.tar` + `.idx`; returns the manifest entry."""
    shards = []
    for first in range(0, len(samples), per_shard):
        name = shard_name(split, first // per_shard)
        with tarfile.open(dst / f"{name}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, jpg, cls in samples[first:first + per_shard]:
                for ext, data in (("jpg", jpg), ("cls", cls)):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        with tarfile.open(dst / f"{name}.tar") as tar:
            members = tar.getmembers()
        lines = [index_line(pair[0].name.split(".")[0], [(m.name.split(".")[1], m.offset_data, m.size) for m in pair])
                 for pair in zip(members[::2], members[1::2])]
        (dst / f"{name}.idx").write_text(index_text(lines))
        blob = (dst / f"{name}.tar").read_bytes()
        shards.append(ShardInfo(f"{name}.tar", f"{name}.idx", len(lines), len(blob), hashlib.sha256(blob).hexdigest()))
    return SplitInfo(len(samples), sum(s.bytes for s in shards), len(samples), 0, 0, shards)


def write_shards(dst, splits: dict, per_shard: int, num_classes: int):
    dst.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(Settings(), "test", num_classes,
                        {s: write_split(dst, s, samples, per_shard) for s, samples in splits.items()})
    write_set_files(dst, manifest, [str(c) for c in range(num_classes)])
    return dst


@pytest.fixture(scope="module")
def dali():
    return pytest.importorskip("nvidia.dali")


@pytest.fixture(scope="module")
def labelled_shards(tmp_path_factory, dali):
    """1,000 flat grey 8x8 JPEGs; sample i has label i (1-3 digits, some with a trailing newline) and grey i % 256,
    in both splits, so a label can be checked against its image."""
    samples = [(f"s{i:04d}", jpeg(np.full((8, 8, 3), i % 256, np.uint8)), f"{i}{chr(10) * (i % 7 == 0)}".encode())
               for i in range(NUM_LABELLED)]
    return write_shards(tmp_path_factory.mktemp("labelled"), {"train": samples, "val": samples}, PER_SHARD, 1000)


def load(path, split, *, world_size=1, rank=0, batch_size=16, epoch=0, backend="dali", **more):
    loader = build_loader(data_path=path, split=split, backend=backend, batch_size=batch_size, device="cpu",
                          rank=rank, world_size=world_size, workers=2, seed=3, img_size=8, **more)
    loader.set_epoch(epoch)
    try:
        batches = [(x.clone(), y.clone()) for x, y in loader]
        return batches, len(loader)
    finally:
        loader.close()


def labels_of(batches) -> list[int]:
    return torch.cat([y for _, y in batches]).tolist()


def epoch_sequence(path, split: str, epoch: int) -> list[int]:
    """Labels of the epoch's sample sequence (rule 1 of pipeline/plan.py); label == position in manifest order."""
    order = epoch_order(shard_list(path, split), seed=3, epoch=epoch, shuffle=split == "train")
    return [int(s.path[-10:-4]) * PER_SHARD + i for s in order for i in range(s.num_samples)]


# -- always run, DALI or not ------------------------------------------------------------------------------------------
def test_missing_dali_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # makes `import nvidia.dali` fail as if not installed
    with pytest.raises(DaliMissingError, match=r"needs NVIDIA DALI: pip install nvidia-dali-cuda130") as err:
        build_loader(data_path=tmp_path, split="train", backend="dali", batch_size=4, device="cpu")
    assert isinstance(err.value, ImportError) and "\n" not in str(err.value)


# -- DALI on CPU ------------------------------------------------------------------------------------------------------
def test_all_1000_labels_parse_and_match_their_images(labelled_shards):
    batches, steps = load(labelled_shards, "val", batch_size=100, dtype=torch.uint8)
    assert steps == 10 and labels_of(batches) == list(range(NUM_LABELLED))  # val reads in manifest order
    grey = torch.cat([x for x, _ in batches]).float().mean(dim=(1, 2, 3))
    assert (grey - torch.arange(NUM_LABELLED) % 256).abs().max() <= 3  # JPEG of a flat grey is off by a level or two


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_train_ranks_split_like_shards_rule(labelled_shards, world_size):
    batch = 16
    for epoch in (0, 1):
        sequence, seen, lengths = epoch_sequence(labelled_shards, "train", epoch), [], set()
        for rank in range(world_size):
            batches, steps = load(labelled_shards, "train", world_size=world_size, rank=rank, epoch=epoch)
            plan = rank_plan(shard_list(labelled_shards, "train"), train=True, batch_size=batch, rank=rank,
                             world_size=world_size, seed=3, epoch=epoch)
            lo, hi = rank_span(NUM_LABELLED, rank, world_size)
            labels = labels_of(batches)
            assert steps == plan.steps == len(batches) and len(labels) == steps * batch
            assert set(labels) <= set(sequence[lo:hi])  # DALI's shard_id/num_shards cut == rank_span
            seen += labels
            lengths.add(steps)
        assert len(lengths) == 1
        assert len(seen) == len(set(seen))  # at most once per epoch
        assert 0 <= NUM_LABELLED - len(seen) < world_size * batch


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_val_reads_each_sample_once_and_pads_with_minus_one(labelled_shards, world_size):
    batch, sequence, real = 16, epoch_sequence(labelled_shards, "val", 0), []
    for rank in range(world_size):
        batches, steps = load(labelled_shards, "val", world_size=world_size, rank=rank, batch_size=batch)
        labels = labels_of(batches)
        lo, hi = rank_span(NUM_LABELLED, rank, world_size)
        assert steps == -(-(-(-NUM_LABELLED // world_size)) // batch) == len(batches)
        assert labels[:hi - lo] == sequence[lo:hi] and set(labels[hi - lo:]) <= {-1}
        real += labels[:hi - lo]
    assert sorted(real) == list(range(NUM_LABELLED))


def test_normalize_in_dali_matches_torch(labelled_shards):
    reference, _ = load(labelled_shards, "val", batch_size=100)
    for dtype, channels_last, atol in ((torch.float32, False, 1e-5), (torch.float32, True, 1e-5),
                                       (torch.float16, False, 2e-3), (torch.bfloat16, True, 1e-2)):
        batches, _ = load(labelled_shards, "val", batch_size=100, dtype=dtype, channels_last=channels_last,
                          options=DaliOptions(normalize_in="dali"))
        x = batches[0][0]
        assert x.dtype == dtype and x.shape == (100, 3, 8, 8)
        assert x.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        torch.testing.assert_close(x.float(), reference[0][0], atol=atol, rtol=0)


@pytest.mark.parametrize("normalize_in", ["torch", "dali"])
def test_hflip_mirrors_the_same_crop(sample_shards, dali, normalize_in):
    def first_batch(hflip):
        loader = build_loader(data_path=sample_shards, split="train", backend="dali", batch_size=8, device="cpu",
                              workers=2, seed=5, img_size=32, hflip=hflip,
                              options=DaliOptions(normalize_in=normalize_in))
        try:
            return next(iter(loader))[0]
        finally:
            loader.close()
    kept, mirrored = first_batch(0.0), first_batch(1.0)  # same seeds: same samples, same crops
    assert (mirrored - kept.flip(-1)).abs().max() <= 1.5 / 127.5  # a level of resampling rounding
    assert (mirrored - kept).abs().mean() > 10 / 127.5  # and the images are not left-right symmetric


def test_bad_labels_name_shard_and_key(tmp_path, dali):
    pixels = jpeg(np.zeros((8, 8, 3), np.uint8))
    for name, cls, problem in (("word", b"cat", r"\.cls is not a decimal label \(b'cat'\)"),
                               ("range", b"4", r"label 4 outside \[0, 4\)")):
        path = write_shards(tmp_path / name, {"val": [("good", pixels, b"1"), ("bad", pixels, cls)]}, 10, 4)
        with pytest.raises(ShardError, match=rf"val-000000\.tar: sample bad: {problem}") as e:
            load(path, "val", batch_size=2)
        assert "\n" not in str(e.value)


def test_corrupt_jpeg_names_the_shard(tmp_path, dali):
    good = jpeg(np.zeros((8, 8, 3), np.uint8))
    path = write_shards(tmp_path, {"val": [("good", good, b"1"), ("broken", good[:40] + b"garbage", b"2")]}, 10, 4)
    with pytest.raises(ShardError, match=r"val batch 0 of epoch 0 \(rank 0\), reading val-000000\.tar: decoders\."):
        load(path, "val", batch_size=2)


def test_rejects_unknown_options(labelled_shards):
    with pytest.raises(TypeError, match="unexpected keyword"):
        DaliOptions(normalise_in="dali")
    with pytest.raises(TypeError, match="options for this backend are a DaliOptions, got HostOptions"):
        load(labelled_shards, "val", options=HostOptions())
    with pytest.raises(ValueError, match="normalize_in must be"):
        load(labelled_shards, "val", options=DaliOptions(normalize_in="cuda"))
    with pytest.raises(ValueError, match="on_error='raise' only"):
        load(labelled_shards, "val", on_error="skip")


def denormalized(path, backend, split, **more) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch of the shared sample shards as 0..255 floats. Host: one worker, so val comes in manifest order."""
    loader = build_loader(data_path=path, split=split, backend=backend, batch_size=8, device="cpu",
                          workers=1 if backend == "host" else 2, seed=0, img_size=48, **more)
    try:
        batches = [(x.clone(), y.clone()) for x, y in loader]
    finally:
        loader.close()
    images = torch.cat([x for x, _ in batches])
    return images * 127.5 + 127.5, torch.cat([y for _, y in batches])  # the contract's default mean = std = 0.5


# img_size 48 keeps the host's DCT-scaled decode (used when the crop is >= 2x the output) off for these <= 96 px
# images, so both backends decode the same full-resolution pixels.
def test_val_parity_with_host(dali, sample_shards):
    host, host_labels = denormalized(sample_shards, "host", "val")
    dali, dali_labels = denormalized(sample_shards, "dali", "val")
    assert dali_labels.tolist() == host_labels.tolist()
    # Same libjpeg-turbo decode, same crop box, bicubic both: only the resampler implementations differ (measured
    # 0.2-0.3 levels per image). A level per image still catches a shifted box, a wrong resize or a channel mix-up.
    per_image = (dali - host).abs().mean(dim=(1, 2, 3))
    assert per_image.max() < 1.0, per_image


def test_train_parity_with_host(dali, sample_shards):
    host, host_labels = denormalized(sample_shards, "host", "train")
    dali, dali_labels = denormalized(sample_shards, "dali", "train")
    assert sorted(dali_labels.tolist()) == sorted(host_labels.tolist())  # 48 samples, 6 batches of 8: all of them
    # Different random crops: the per-channel mean/std of 48 crops moves by about 2 levels between seeds of one
    # backend (measured), so 8 levels is ~3.5 sigma of a difference; a swapped channel (R-B differ by ~45 here),
    # missing normalization or a wrong mean moves them by far more.
    for stat in (lambda x: x.mean(dim=(0, 2, 3)), lambda x: x.std(dim=(0, 2, 3))):
        assert (stat(dali) - stat(host)).abs().max() < 8.0, (stat(dali), stat(host))


# -- on a CUDA GPU ----------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_decode_matches_cpu_decode(labelled_shards):
    cpu, _ = load(labelled_shards, "val", batch_size=100, dtype=torch.uint8)
    loader = build_loader(data_path=labelled_shards, split="val", backend="dali", batch_size=100, device="cuda",
                          workers=2, seed=3, img_size=8, dtype=torch.uint8)
    gpu = [(x.cpu(), y.cpu()) for x, y in loader]
    loader.close()
    assert labels_of(gpu) == labels_of(cpu)
    # nvJPEG and libjpeg-turbo upsample chroma differently; on flat grey images that is at most a level or two.
    diff = (torch.cat([x for x, _ in gpu]).float() - torch.cat([x for x, _ in cpu]).float()).abs()
    assert diff.mean() < 1.0


@pytest.mark.gpu
@pytest.mark.parametrize("normalize_in", ["torch", "dali"])
def test_gpu_train_batches_follow_the_contract(sample_shards, normalize_in):
    loader = build_loader(data_path=sample_shards, split="train", backend="dali", batch_size=8, device="cuda",
                          workers=2, seed=0, img_size=32, channels_last=True,
                          options=DaliOptions(normalize_in=normalize_in))
    with loader:
        batches = [(x.clone(), y.clone()) for x, y in loader]
    x, y = batches[0]
    assert len(batches) == len(loader) == 6
    assert x.is_cuda and y.is_cuda and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape == (8, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)
    # mean = std = 0.5: pixels map onto [-1, 1]; DALI's float arithmetic may land a hair outside (seen on an H100).
    assert -1.0 - 1e-5 <= x.min() and x.max() <= 1.0 + 1e-5 and x.std() > 0.1
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == sorted([c for c in range(4) for _ in range(12)])


# -- one pipeline per loader, the same batches as the host backend ----------------------------------------------
def test_one_pipeline_runs_across_epochs_and_rebuilds_only_on_a_jump(labelled_shards):
    loader = build_loader(data_path=labelled_shards, split="train", backend="dali", batch_size=50, device="cpu",
                          workers=2, seed=3, img_size=8, dtype=torch.uint8)
    planner = loader.planner
    try:
        for epoch, builds in ((0, 1), (1, 1), (2, 1), (5, 2), (6, 2)):  # 2 -> 5: a jump, as a resume makes
            loader.set_epoch(epoch)
            batches = [y.clone() for _, y in loader]
            assert loader.run.number == builds
            expected = [[int(s.path[-10:-4]) * PER_SHARD + i for s, i in planner.batch(epoch, k)]
                        for k in range(len(loader))]
            assert [b.tolist() for b in batches] == expected  # the plan's samples, in the plan's order
        loader.set_epoch(7)
        next(iter(loader))  # an epoch abandoned after one batch: the next one cannot follow on
        loader.set_epoch(8)
        assert len([y for _, y in loader]) == len(loader) and loader.run.number == 3
    finally:
        loader.close()


def test_a_state_round_trip_and_an_elastic_one_read_the_plans_samples(labelled_shards):
    """A state taken mid-epoch on one rank resumes the same samples in the same batches (DALI draws its crops anew),
    and on 2 ranks the samples that the first part did not read, each once."""
    epoch_of = lambda loader: [y.tolist() for _, y in loader]  # noqa: E731 - label == sample
    with build_loader(data_path=labelled_shards, split="train", backend="dali", batch_size=50, device="cpu",
                      workers=2, seed=3, img_size=8, dtype=torch.uint8) as first:
        first.set_epoch(1)
        taken = [y.tolist() for _, (_, y) in zip(range(4), first)]
        state = first.state_dict()
        rest = epoch_of(first)
    with build_loader(data_path=labelled_shards, split="train", backend="dali", batch_size=50, device="cpu",
                      workers=2, seed=3, img_size=8, dtype=torch.uint8) as again:
        again.load_state_dict(state)
        assert epoch_of(again) == rest and again.run.number == 1  # one pipeline, started at the position
    read = []
    for rank in range(2):
        with build_loader(data_path=labelled_shards, split="train", backend="dali", batch_size=30, device="cpu",
                          rank=rank, world_size=2, workers=2, seed=3, img_size=8, dtype=torch.uint8) as half:
            half.load_state_dict(state)
            read += [s for batch in epoch_of(half) for s in batch]
    first_part = {s for batch in taken for s in batch}
    assert len(set(read)) == len(read) and not first_part & set(read)
    assert len(read) == (1000 - 200) // 60 * 60  # the rest, but for its tail that cannot fill a batch per rank


def test_one_pipeline_follows_a_resolution_schedule(labelled_shards):
    # 16, 32, 48 px, then 48: each epoch's side rides with its batches into the resize, the pipeline runs on
    schedule = ResSchedule(16, 48, 0, 2, step=16)
    loader = build_loader(data_path=labelled_shards, split="train", backend="dali", batch_size=50, device="cpu",
                          workers=2, seed=3, img_size=48, res_schedule=schedule, dtype=torch.uint8)
    planner = loader.planner
    try:
        for epoch in range(4):
            loader.set_epoch(epoch)
            batches = [(tuple(x.shape), y.clone()) for x, y in loader]
            side = schedule.size(epoch)
            assert {shape for shape, _ in batches} == {(50, 3, side, side)}, epoch
            expected = [[int(s.path[-10:-4]) * PER_SHARD + i for s, i in planner.batch(epoch, k)]
                        for k in range(len(loader))]
            assert [y.tolist() for _, y in batches] == expected
        assert loader.run.number == 1
    finally:
        loader.close()


@pytest.mark.parametrize("split", ["train", "val"])
def test_dali_and_host_put_the_same_samples_in_the_same_batches(labelled_shards, split):
    for rank in range(2):
        for epoch in (0, 1):
            dali_batches, _ = load(labelled_shards, split, world_size=2, rank=rank, epoch=epoch, batch_size=48)
            host_batches, _ = load(labelled_shards, split, world_size=2, rank=rank, epoch=epoch, batch_size=48,
                                   backend="host")
            assert [y.tolist() for _, y in dali_batches] == [y.tolist() for _, y in host_batches]


def test_readers_option_is_checked(labelled_shards):
    with pytest.raises(ValueError, match="readers must be an integer >= 1"):
        build_loader(data_path=labelled_shards, split="train", backend="dali", batch_size=50, device="cpu",
                     options=DaliOptions(readers=0))


# -- train augmentation (pipeline/augment.py) in the one pipeline -------------------------------------------------
RAND = "rand-m9-mstd0.5-inc1"


def first_tiles(path, split="train", device="cpu", **more) -> tuple[torch.Tensor, str]:
    """The first 3 batches of 8 of the shared sample shards at 32 px (seed 5), on the CPU, and the loader's line."""
    loader = build_loader(data_path=path, split=split, backend="dali", batch_size=8, device=device, workers=2, seed=5,
                          img_size=32, **more)
    try:
        return torch.cat([x.clone().cpu() for x, _ in itertools.islice(loader, 3)]), loader.describe()
    finally:
        loader.close()


def untouched(x: torch.Tensor, plain: torch.Tensor) -> torch.Tensor:
    """Per tile: bit for bit the unaugmented tile (the same seeds give the same crops and flips)."""
    return (x == plain).flatten(1).all(dim=1)


@pytest.fixture(scope="module")
def plain_tiles(sample_shards, dali):
    return first_tiles(sample_shards)[0]


def test_rand_augment_changes_tiles_after_the_same_crops(sample_shards, plain_tiles):
    x, summary = first_tiles(sample_shards, aa=RAND)
    assert x.shape == (24, 3, 32, 32) and x.dtype == torch.float32
    assert f"augment --aa {RAND}" in summary
    # timm's p = 0.5 for each of 2 layers: about 1 tile in 4 skips both, and is the plain tile exactly
    assert 0 < untouched(x, plain_tiles).sum() < 12
    # DALI normalizing: its mirror moves from crop_mirror_normalize to the resize, before the ops. Another pipeline,
    # the same seed: the same draws, the same tiles
    y, _ = first_tiles(sample_shards, aa=RAND, options=DaliOptions(normalize_in="dali"))
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)


class Sign:
    """An rng for `LEVEL_TO_ARG` that gives one sign: which one DALI drew for a tile is not known here."""

    def __init__(self, negative: bool):
        self.negative = negative

    def random(self) -> float:
        return 1.0 if self.negative else 0.0


@pytest.mark.parametrize("name", ["Invert", "SolarizeIncreasing", "PosterizeIncreasing", "SolarizeAdd", "Brightness",
                                  "Contrast", "Color", "AutoContrast", "ShearX", "ShearY", "TranslateXRel",
                                  "TranslateYRel", "Rotate"])
def test_each_op_gives_the_host_ops_tile_within_a_level(sample_shards, monkeypatch, name):
    # One op, always applied, at m9: DALI's tile against pipeline/augment.py's op on DALI's own unaugmented tile
    # (the same seed gives the same crops and flips), with the argument of either sign
    from pipeline import augment as A

    monkeypatch.setitem(A.RAND_SETS, "one", (name,))
    plain = first_tiles(sample_shards, dtype=torch.uint8)[0]
    ours = first_tiles(sample_shards, dtype=torch.uint8, aa="rand-m9-n1-p1.0-tone")[0]
    worst = worst_op_difference(name, ours, plain)
    # DALI's warps treat the pixels along the fill's edge by their own rule, which weighs on a 32 px tile
    assert worst <= (2.0 if name in ("ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "Rotate") else 1.0), \
        (name, worst)


@pytest.mark.parametrize("name", ["TranslateXRel", "TranslateYRel"])
def test_a_translation_is_a_share_of_the_epochs_side_under_a_schedule(sample_shards, monkeypatch, name):
    # Epoch 0 of a 16 -> 32 px ramp: 16 px tiles, shifted by timm's share of 16 px, not of the loader's 32
    from pipeline import augment as A

    monkeypatch.setitem(A.RAND_SETS, "one", (name,))
    schedule = ResSchedule(16, 32, 1, 2, step=16)
    plain = first_tiles(sample_shards, dtype=torch.uint8, res_schedule=schedule)[0]
    ours = first_tiles(sample_shards, dtype=torch.uint8, res_schedule=schedule, aa="rand-m9-n1-p1.0-tone")[0]
    assert ours.shape[-1] == 16 and not untouched(ours, plain).all()
    # the fill's edge weighs twice what it does at 32 px; a shift of the wrong side's share is ~50 levels off
    assert worst_op_difference(name, ours, plain) <= 5.0


def worst_op_difference(name: str, ours: torch.Tensor, plain: torch.Tensor) -> float:
    """The largest mean difference between a tile DALI gave and pipeline/augment.py's op `name` (at m9, either sign)
    on DALI's own unaugmented tile."""
    from pipeline import augment as A

    aug = A.parse("rand-m9-n1-p1.0-tone", None, (0.5, 0.5, 0.5))
    level_to_arg = A.LEVEL_TO_ARG[name]
    signs = [level_to_arg(9, Sign(negative), aug) for negative in (False, True)] if level_to_arg else [()]
    worst = 0.0
    for tile, base in zip(ours, plain):
        diffs = []
        for args in signs:
            expected = base.permute(1, 2, 0).numpy().copy()
            A.run(expected, [(name, args)], aug.fill)
            diffs.append(np.abs(tile.permute(1, 2, 0).numpy().astype(int) - expected).mean())
        worst = max(worst, min(diffs))
    return worst


@pytest.mark.parametrize("aa", ["original", "v0r", "3a", "rand-m7-n3-tweights-mstd101", "rand-m9-t3aw-mmax12",
                                "ta_wide"])
def test_other_policies_build_and_run(sample_shards, plain_tiles, aa):
    x, summary = first_tiles(sample_shards, aa=aa)
    assert x.shape == (24, 3, 32, 32) and f"augment --aa {aa}" in summary
    assert not untouched(x, plain_tiles).all()


@pytest.mark.parametrize("jitter", ["0.4", "0.1,0.2,0.3,0.05"])
def test_color_jitter_changes_every_tile(sample_shards, plain_tiles, jitter):
    x, summary = first_tiles(sample_shards, color_jitter=jitter)
    assert x.shape == (24, 3, 32, 32) and "augment color jitter" in summary
    assert not untouched(x, plain_tiles).any()


def test_eval_is_not_augmented(sample_shards, dali):
    plain, _ = first_tiles(sample_shards, "val")
    x, summary = first_tiles(sample_shards, "val", aa=RAND, color_jitter="0.4")
    assert torch.equal(x, plain) and summary.endswith("augment none")


@pytest.mark.gpu
@pytest.mark.parametrize("normalize_in", ["torch", "dali"])
def test_gpu_augments_on_the_gpu(sample_shards, normalize_in):
    options = DaliOptions(normalize_in=normalize_in)
    plain, _ = first_tiles(sample_shards, device="cuda", options=options)
    for more in (dict(aa=RAND), dict(aa="original"), dict(aa="3a"), dict(color_jitter="0.4,0.4,0.4,0.1")):
        x, _ = first_tiles(sample_shards, device="cuda", options=options, **more)
        assert x.shape == (24, 3, 32, 32) and x.dtype == torch.float32
        assert not untouched(x, plain).all(), more


# -- reader processes: how they start (pipeline/dali.py reader_start_method, pipeline/dali_reader.py) ------------------
@pytest.fixture
def cuda_started(monkeypatch, dali):
    """This process as after torch.cuda.is_available() on a GPU machine: DALI's own check (the one that makes it refuse
    to fork its readers) says the CUDA driver is initialised."""
    import nvidia.dali.backend

    monkeypatch.setattr(nvidia.dali.backend, "IsDriverInitialized", lambda: True)


def first_batch(path, **options):
    loader = build_loader(data_path=path, split="train", backend="dali", batch_size=16, device="cpu", workers=2,
                          seed=3, img_size=8, dtype=torch.uint8, options=DaliOptions(**options))
    try:
        images, labels = next(iter(loader))
        return images.clone(), labels.clone(), loader.start_method
    finally:
        loader.close()


def test_readers_spawn_once_cuda_has_started_and_give_the_same_batch(labelled_shards):
    forked = first_batch(labelled_shards)
    with pytest.MonkeyPatch.context() as m:
        import nvidia.dali.backend

        m.setattr(nvidia.dali.backend, "IsDriverInitialized", lambda: True)
        spawned = first_batch(labelled_shards)
    assert (forked[2], spawned[2]) == ("fork", "spawn")
    assert torch.equal(forked[0], spawned[0]) and torch.equal(forked[1], spawned[1])


def test_readers_spawn_once_an_npu_runtime_has_started(labelled_shards, monkeypatch):
    import types

    monkeypatch.setattr(torch, "npu", types.SimpleNamespace(is_initialized=lambda: True), raising=False)
    assert first_batch(labelled_shards)[2] == "spawn"


def test_forking_after_cuda_started_is_one_line(labelled_shards, cuda_started):
    with pytest.raises(ValueError, match=r"^--dali-py-start-method fork: this process has started the CUDA driver, "
                                         r"which forked reader processes cannot share; use spawn") as err:
        first_batch(labelled_shards, py_start_method="fork")
    assert "\n" not in str(err.value)


def test_a_spawned_reader_imports_no_torch(labelled_shards, tmp_path):
    """What a spawned reader unpickles (the source) and imports with it: not torch (seconds and ~0.4 GB a reader)."""
    import pickle
    import subprocess

    from pipeline.dali_reader import BatchSource
    from pipeline.loader import LoaderSpec
    from pipeline.shards.format import shard_list as shards_of

    spec = LoaderSpec(str(labelled_shards), "train", 16, torch.device("cpu"), img_size=8)
    (tmp_path / "source.pkl").write_bytes(pickle.dumps(BatchSource(spec.planner(shards_of(labelled_shards, "train")),
                                                                   0, [0, 1], [0, 1], 1000, 8)))
    code = ("import pickle, sys, types; source = pickle.load(open(sys.argv[1], 'rb')); "
            "jpegs, labels, sides = source(types.SimpleNamespace(iteration=1)); "
            "print(len(jpegs), int(sides[0][0]), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "source.pkl")], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["16", "8", "False"]


# -- GPU decoder memory (pipeline/dali.py CudaOutput): set up without touching CUDA, so it is checked here ------------
@pytest.mark.parametrize("split, preallocate, scratch", [("train", True, "1.57 GiB GPU + 2.09 GiB pinned"),
                                                         ("train", False, "0.12 GiB GPU + 0.12 GiB pinned"),
                                                         ("val", True, "0.12 GiB GPU + 0.12 GiB pinned")])
def test_gpu_decoder_scratch_is_reserved_for_train_only_and_said(labelled_shards, split, preallocate, scratch):
    """nvJPEG's scratch is per decoder thread: ImageNet-sized hints at 8 threads are 1.7 GB of GPU and 2.25 GB of
    pinned memory a pipeline. Val (up all run, each image once an evaluation) keeps DALI's defaults."""
    loader = build_loader(data_path=labelled_shards, split=split, backend="dali", batch_size=16, device="cuda:0",
                          workers=8, img_size=8, options=DaliOptions(preallocate=preallocate))
    hinted = "device_memory_padding" in loader.output.decoder
    assert hinted == (split == "train" and preallocate)
    assert f"decoder scratch {scratch}" in loader.describe()
