"""pipeline/augment.py: timm's spellings, each op against timm's own op on the same tile (both our paths: the kernels
of pipeline/_augment.c and the Pillow fallback), the draws against timm's over 10,000 samples (chi-square), and
the host loader applying it deterministically, on train only."""
import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import auto_augment as timm_aa

from pipeline import augment as A
from pipeline.augment import AugmentError, parse
from pipeline.backends import build_loader

FILL = (128, 128, 128)
NO_SCIPY = "scipy is not installed: its chi-square test compares the draws"


def photo_tile(size=96, seed=0) -> np.ndarray:
    """Gradients, edges and noise: every op has something to change, and the histograms are not flat."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([(x * 2.3) % 256, (y * 1.7 + x * 0.6) % 256, 60 + ((x - y) > 10) * 120.0], -1)
    return np.clip(base + rng.normal(0, 14, base.shape), 0, 255).astype(np.uint8)


# -- the spec ---------------------------------------------------------------------------------------------------------
def test_timm_randaugment_spellings():
    a = parse("rand-m9-mstd0.5-inc1", None, (0.5, 0.5, 0.5))
    assert [op.name for op in a.ops] == list(timm_aa._RAND_INCREASING_TRANSFORMS)
    assert {(op.prob, op.magnitude) for op in a.ops} == {(0.5, 9)}
    assert (a.num_layers, a.magnitude_std, a.weights, a.fill) == (2, 0.5, None, FILL)
    b = parse("rand-m7-n3-p1.0-mmax12-mstd101-tweights", None, (0.485, 0.456, 0.406))
    assert b.num_layers == 3 and b.magnitude_max == 12 and b.magnitude_std == float("inf")
    assert [op.name for op in b.ops] == list(timm_aa._RAND_WEIGHTED_0) and abs(sum(b.weights) - 1) < 1e-9
    assert b.fill == (124, 116, 104)  # timm: round(255 * mean)
    assert [op.name for op in parse("rand-m9", None, (0.5,) * 3).ops] == list(timm_aa._RAND_TRANSFORMS)
    assert parse("rand-m9-mmax0", None, (0.5,) * 3).magnitude_max == 10  # timm: mmax0 is the default


@pytest.mark.parametrize("name", ["original", "originalr", "v0", "v0r", "3a"])
def test_timm_autoaugment_policies_are_timms(name):
    ours = parse(f"{name}-mstd0.5", None, (0.5,) * 3)
    theirs = timm_aa.auto_augment_policy(name, dict(timm_aa._HPARAMS_DEFAULT))
    assert [[(op.name, op.prob, op.magnitude) for op in sub] for sub in ours.policy] == \
        [[(op.name, op.prob, op.magnitude) for op in sub] for sub in theirs]
    assert ours.magnitude_std == 0.5


@pytest.mark.parametrize("spec, words", [
    ("rand-x9", "unknown section x9"), ("rand-m9-q3", "unknown section q3"), ("rand-mfoo", "cannot read"),
    ("rand-m-1", "cannot read"), ("rand-n1.5", "n wants an integer"), ("rand-tfoo", "unknown op set tfoo"),
    ("bogus", "unknown policy 'bogus'"), ("augmix-m5", "AugMix is not supported"),
    ("original-n2", "AutoAugment takes only -mstd"), ("rand-p-0.5", "cannot read"),
    ("rand-m1000", "magnitudes above 100"), ("rand-m9-mmax101", "magnitudes above 100"),
])
def test_a_bad_spec_is_one_line_naming_the_flag(spec, words):
    with pytest.raises(AugmentError) as e:
        parse(spec, None, (0.5,) * 3)
    assert str(e.value).startswith(f"--aa {spec}: ") and words in str(e.value) and "\n" not in str(e.value)


def test_color_jitter_as_timm_reads_it():
    assert parse(None, "0.4", (0.5,) * 3).color_jitter == (0.4, 0.4, 0.4, 0.0)
    assert parse(None, "0.1,0.2,0.3,0.05", (0.5,) * 3).color_jitter == (0.1, 0.2, 0.3, 0.05)
    assert parse(None, 0.0, (0.5,) * 3).active is False
    assert parse("rand-m9", "0.4", (0.5,) * 3).color_jitter is None  # timm: off under --aa ...
    assert parse("3a", "0.4", (0.5,) * 3).color_jitter == (0.4, 0.4, 0.4, 0.0)  # ... except its 3a
    for bad in ("a", "0.1,0.2", "-0.4", "0.1,0.1,0.1,0.9"):
        with pytest.raises(AugmentError, match=r"^--color-jitter "):
            parse(None, bad, (0.5,) * 3)


# -- each op against timm's on the same tile --------------------------------------------------------------------------
OP_CASES = [("AutoContrast", ()), ("Equalize", ()), ("Invert", ()), ("Rotate", (27.0,)), ("Rotate", (-13.5,)),
            ("Rotate", (90.0,)), ("Posterize", (2,)), ("Posterize", (8,)), ("Solarize", (100,)),
            ("SolarizeAdd", (99,)), ("Color", (1.7,)), ("Color", (0.3,)), ("Contrast", (0.3,)), ("Contrast", (1.8,)),
            ("Brightness", (1.6,)), ("Brightness", (0.4,)), ("Sharpness", (1.9,)), ("Sharpness", (0.2,)),
            ("ShearX", (0.27,)), ("ShearY", (-0.27,)), ("TranslateXRel", (0.4,)), ("TranslateYRel", (-0.3,)),
            ("Desaturate", (0.7,)), ("GaussianBlur", (1.2,))]


@pytest.fixture(params=["kernels", "pillow"])
def op_path(request, monkeypatch):
    # The Pillow path makes timm's own calls for most ops: there the test checks the wiring (names, arguments,
    # fill), and the ops of our own (SolarizeAdd, Posterize to 0 bits, hue)
    if request.param == "kernels":
        if not A.KERNELS_BUILT:
            pytest.skip("pipeline/_augment.c is not built")
    else:
        monkeypatch.setattr(A, "_augment", None)
    return request.param


@pytest.mark.parametrize("name, args", OP_CASES, ids=[f"{n}{a}" for n, a in OP_CASES])
@pytest.mark.parametrize("shape", [(97, 97), (17, 31), (3, 2)], ids=["97x97", "17x31", "3x2"])
def test_each_op_matches_timms_op_on_the_same_tile(name, args, shape, op_path):
    tile = photo_tile(max(shape))[:shape[0], :shape[1]].copy()  # odd sizes: a rotation's centre between pixels
    theirs = np.asarray(timm_aa.NAME_TO_OP[name](Image.fromarray(tile), *args, fillcolor=FILL,
                                                  resample=Image.BILINEAR))
    ours = tile.copy()
    A.run(ours, [(name, args)], FILL)
    diff = np.abs(theirs.astype(int) - ours)
    assert diff.mean() <= 0.5 and diff.max() <= 2, (name, diff.mean(), diff.max())  # the goal: a mean within 2
    if shape == (97, 97):  # the op did something (on a tile of 6 pixels some do not)
        assert not np.array_equal(ours, tile) or (name, args) == ("Posterize", (8,))


def test_posterize_to_no_bits_is_black_on_every_pillow(op_path):
    # timm's increasing Posterize reaches 0 bits at magnitude 10; Pillow 13's ImageOps.posterize refuses 0 (and timm's
    # own op raises there), Pillow 12's gives black: ours gives black on both paths
    tile = photo_tile()
    A.run(tile, [("PosterizeIncreasing", (0,))], FILL)
    assert not tile.any()


def test_hue_is_torchvisions_adjust_hue():
    from torchvision.transforms import functional as F

    tile = photo_tile()
    for shift in (0.1, -0.23):
        ours = tile.copy()
        A.run(ours, [("Hue", (shift,))], FILL)
        assert np.array_equal(ours, np.asarray(F.adjust_hue(Image.fromarray(tile), shift)))


# -- the draws against timm's ------------------------------------------------------------------------------------------
def timm_draws(spec: str, samples: int, seed=0) -> list[list[tuple[str, tuple]]]:
    """What timm's own transform draws, op by op: its ops' functions replaced by recorders."""
    hparams = dict(translate_const=100, img_mean=FILL, interpolation=Image.BILINEAR)
    transform = (timm_aa.rand_augment_transform if spec.startswith("rand") else timm_aa.auto_augment_transform)(
        spec, hparams)
    record: list[tuple[str, tuple]] = []
    ops = transform.ops if hasattr(transform, "ops") else [op for sub in transform.policy for op in sub]
    def recorder(name):
        def aug_fn(img, *args, **kw):
            if name == "GaussianBlurRand":  # timm's op draws its radius itself: record that draw
                args = (random.uniform(0.1, 2.0 * args[0]),)
            record.append((name, args))
            return img
        return aug_fn

    for op in ops:
        op.aug_fn = recorder(op.name)
    random.seed(seed)
    np.random.seed(seed)
    image, out = Image.new("RGB", (4, 4)), []
    for _ in range(samples):
        record.clear()
        transform(image)
        out.append(list(record))
    return out


def our_draws(spec: str, samples: int, seed=0) -> list[list[tuple[str, tuple]]]:
    aug, rng = parse(spec, None, (0.5,) * 3), random.Random(seed)
    return [aug.draw(rng) for _ in range(samples)]


def same_distribution(a: list, b: list) -> float:
    """The chi-square test's p-value that two samples of labels come from one distribution."""
    from scipy.stats import chi2_contingency  # its callers skip without scipy
    ca, cb = Counter(a), Counter(b)
    keys = sorted(set(ca) | set(cb), key=str)
    return chi2_contingency([[ca[k] for k in keys], [cb[k] for k in keys]])[1]


def binned(draws, name: str, bins: np.ndarray) -> list:
    return [int(np.digitize(args[0], bins)) for sample in draws for op, args in sample if op == name]


@pytest.mark.parametrize("spec", ["rand-m9-mstd0.5-inc1", "rand-m7-n3-mstd101", "rand-m9-n2-tweights", "original",
                                  "v0r-mstd0.5", "rand-m9-mmax5-mstd1", "3a"])
def test_op_choice_and_magnitudes_follow_timms_distribution(spec):
    pytest.importorskip("scipy.stats", reason=NO_SCIPY)
    n = 10_000
    ours, theirs = our_draws(spec, n), timm_draws(spec, n)
    p_values = {"ops per sample": same_distribution([len(s) for s in ours], [len(s) for s in theirs]),
                "op choice": same_distribution([op for s in ours for op, _ in s], [op for s in theirs for op, _ in s])}
    for name, bins in (("Rotate", np.linspace(-30, 30, 13)), ("ShearX", np.linspace(-0.3, 0.3, 13)),
                       ("GaussianBlurRand", np.linspace(0, 2, 9)), ("Desaturate", np.linspace(0.5, 1, 6)),
                       ("ColorIncreasing", np.linspace(0.1, 1.9, 10)), ("Color", np.linspace(0.1, 1.9, 10)),
                       ("PosterizeIncreasing", np.arange(0, 5)), ("Solarize", np.linspace(0, 256, 9))):
        a, b = binned(ours, name, bins), binned(theirs, name, bins)
        if len(a) > 200:
            p_values[name] = same_distribution(a, b)
    assert len(p_values) >= 3 or spec == "3a"  # 3a: one op a sample, of three
    assert min(p_values.values()) > 1e-3, p_values


def test_the_chi_square_check_tells_a_different_magnitude_spread():
    pytest.importorskip("scipy.stats", reason=NO_SCIPY)
    # The power of the test above: a magnitude std of 0.5 against none is told apart.
    n = 10_000
    ours, theirs = our_draws("rand-m9-inc1", n), timm_draws("rand-m9-mstd0.5-inc1", n)
    assert same_distribution(binned(ours, "Rotate", np.linspace(-30, 30, 25)),
                             binned(theirs, "Rotate", np.linspace(-30, 30, 25))) < 1e-6


def test_a_seeded_draw_repeats_and_a_color_jitter_draws_all_factors():
    aug = parse(None, "0.4,0.4,0.4,0.1", (0.5,) * 3)
    assert aug.draw(random.Random(3)) == aug.draw(random.Random(3))
    steps = aug.draw(random.Random(3))
    assert sorted(name for name, _ in steps) == ["Brightness", "Color", "Contrast", "Hue"]
    assert all(0.6 <= args[0] <= 1.4 for name, args in steps if name != "Hue")


# -- in the host loader -----------------------------------------------------------------------------------------------
def batches(shards, split="train", **kw):
    with build_loader(data_path=shards, split=split, backend="host", batch_size=4, device="cpu", img_size=32,
                      dtype=torch.uint8, seed=1, **kw) as loader:
        return [images.clone() for images, _ in loader]


def test_the_host_loader_augments_train_deterministically_whatever_the_workers(sample_shards):
    plain = batches(sample_shards, workers=1)
    one = batches(sample_shards, workers=1, aa="rand-m9-mstd0.5-inc1")
    two = batches(sample_shards, workers=2, aa="rand-m9-mstd0.5-inc1")
    assert all(torch.equal(a, b) for a, b in zip(one, two)) and len(one) == len(two) == len(plain)
    changed = sum(not torch.equal(a, b) for a, b in zip(plain, one))
    assert changed >= len(plain) - 1  # 4 samples a batch, each unchanged with probability ~0.3


def test_eval_is_not_augmented(sample_shards):
    plain = batches(sample_shards, split="val", workers=1)
    augmented = batches(sample_shards, split="val", workers=1, aa="rand-m9-mstd0.5-inc1", color_jitter="0.4")
    assert all(torch.equal(a, b) for a, b in zip(plain, augmented))


def test_a_bad_spec_stops_the_loader_before_it_starts(sample_shards):
    with pytest.raises(AugmentError, match="^--aa rand-z1: "):
        build_loader(data_path=sample_shards, backend="host", batch_size=4, device="cpu", aa="rand-z1")


# -- TrivialAugment against torchvision's TrivialAugmentWide -------------------------------------------------------
TRIVIAL_CASES = [("ShearX", 0.5), ("ShearX", -0.33), ("ShearY", 0.7), ("TranslateX", 20.3), ("TranslateY", -31.0),
                 ("Rotate", 100.5), ("Rotate", -45.0), ("Brightness", 0.5), ("Color", -0.7), ("Contrast", 0.9),
                 ("Sharpness", -0.5), ("Posterize", 3.0), ("Solarize", 127.5), ("AutoContrast", 0.0),
                 ("Equalize", 0.0), ("Identity", 0.0)]


def trivial_name(torchvision_name: str) -> str:
    return torchvision_name if torchvision_name in ("AutoContrast", "Equalize", "Identity") else \
        "Trivial" + torchvision_name


@pytest.mark.parametrize("name, magnitude", TRIVIAL_CASES, ids=[f"{n}{m}" for n, m in TRIVIAL_CASES])
def test_each_trivial_op_matches_torchvisions_on_the_same_tile(name, magnitude, op_path):
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.autoaugment import _apply_op

    tile = photo_tile(97)
    theirs = np.asarray(_apply_op(Image.fromarray(tile), name, magnitude, interpolation=InterpolationMode.NEAREST,
                                  fill=None))
    ours = tile.copy()
    A.run(ours, [(trivial_name(name), () if name in ("AutoContrast", "Equalize", "Identity") else (magnitude,))],
          (0, 0, 0))
    diff = np.abs(theirs.astype(int) - ours)
    # nearest resampling: a pixel on the boundary between two source pixels may take the other one
    assert diff.mean() <= 0.5 and np.mean(diff > 2) <= 0.01, (name, diff.mean(), np.mean(diff > 2))


def test_trivial_draws_follow_torchvisions(monkeypatch):
    pytest.importorskip("scipy.stats", reason=NO_SCIPY)
    from torchvision.transforms import autoaugment

    record = []
    monkeypatch.setattr(autoaugment, "_apply_op", lambda img, op, m, **kw: record.append((op, m)) or img)
    torch.manual_seed(0)
    transform, image = autoaugment.TrivialAugmentWide(), Image.new("RGB", (4, 4))
    for _ in range(10_000):
        transform(image)
    theirs = [(trivial_name(op), round(m, 4)) for op, m in record]
    aug, rng = parse("ta_wide", None, (0.5,) * 3), random.Random(0)
    ours = [(name, round(args[0], 4) if args else 0.0) for name, args in (aug.draw(rng)[0] for _ in range(10_000))]
    assert same_distribution([n for n, _ in ours], [n for n, _ in theirs]) > 1e-3
    for name in ("TrivialRotate", "TrivialPosterize", "TrivialSolarize"):
        a = [np.sign(m) * np.digitize(abs(m), np.unique([abs(v) for n, v in theirs if n == name])[::4])
             for n, m in ours if n == name]
        b = [np.sign(m) * np.digitize(abs(m), np.unique([abs(v) for n, v in theirs if n == name])[::4])
             for n, m in theirs if n == name]
        assert same_distribution(a, b) > 1e-3, name
    assert parse("ta_wide", None, (0.5,) * 3).fill == (0, 0, 0)  # torchvision's default fill
    with pytest.raises(AugmentError, match="ta_wide takes no sections"):
        parse("ta_wide-m9", None, (0.5,) * 3)


def test_the_host_loader_says_when_stock_pillow_or_no_kernels_run(sample_shards, monkeypatch):
    import pipeline.host as host

    def notes(**kw):
        with build_loader(data_path=sample_shards, backend="host", batch_size=4, device="cpu", workers=1,
                          img_size=32, **kw) as loader:
            return loader.notes()

    monkeypatch.setattr(host, "pillow_is_simd", lambda: True)
    monkeypatch.setattr(host, "KERNELS_BUILT", True)
    assert notes(aa="rand-m9") == []
    monkeypatch.setattr(host, "pillow_is_simd", lambda: False)
    assert [n for n in notes() if "not Pillow-SIMD" in n and "install_pillow_simd.sh" in n]
    monkeypatch.setattr(host, "KERNELS_BUILT", False)
    assert [n for n in notes(aa="rand-m9") if "_augment.c" in n] and not [n for n in notes() if "_augment.c" in n]


@pytest.mark.skipif(not A.KERNELS_BUILT, reason="pipeline/_augment.c is not built")
def test_the_kernels_refuse_buffers_of_the_wrong_shape_or_type():
    tile = photo_tile(8)
    for bad in (tile[..., 0].copy(), tile.astype(np.float32), tile[:, ::2], np.zeros((4, 4, 4), np.uint8)):
        with pytest.raises(ValueError, match="tile|C-contiguous"):
            A._augment.point(bad, A._augment.INVERT, 0, 0, 0.0)
    with pytest.raises(ValueError, match="two distinct tiles of one shape"):
        A._augment.affine(tile, tile, (1, 0, 0, 0, 1, 0), FILL, True)
    with pytest.raises(ValueError, match="two distinct tiles of one shape"):
        A._augment.sharpen(tile, np.empty((8, 9, 3), np.uint8), 1.5)
    with pytest.raises(ValueError, match="unknown point op"):
        A._augment.point(tile, 99, 0, 0, 0.0)
