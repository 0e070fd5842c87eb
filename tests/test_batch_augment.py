"""trainlib/batch_augment.py: mixup/cutmix and random erasing draw what timm's Mixup and RandomErasing draw, apply it
the same way on whole batches, keep pixel input equivalent to normalized input, and resume their streams exactly."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from timm.data import Mixup as TimmMixup
from timm.data.random_erasing import RandomErasing as TimmErasing

from trainlib.batch_augment import BatchAugment, Mixup, RandomErasing
from trainlib.config import TrainConfig

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLASSES = 7


def batch(n=8, size=(3, 20, 24), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *size), generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def ours(seed=0, **kw) -> Mixup:
    args = dict(mixup_alpha=0.8, cutmix_alpha=1.0, cutmix_minmax=None, prob=1.0, switch_prob=0.5, mode="batch",
                label_smoothing=0.1, num_classes=CLASSES)
    args.update(kw)
    return Mixup(rng=np.random.RandomState(seed), **args)


def timms(**kw) -> TimmMixup:
    args = dict(mixup_alpha=0.8, cutmix_alpha=1.0, cutmix_minmax=None, prob=1.0, switch_prob=0.5, mode="batch",
                label_smoothing=0.1, num_classes=CLASSES)
    args.update(kw)
    return TimmMixup(**args)


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
@pytest.mark.parametrize("alphas", [(0.8, 1.0, None), (0.8, 0.0, None), (0.0, 1.0, None), (0.0, 0.0, (0.2, 0.8))])
def test_mixup_and_cutmix_equal_timms_for_the_same_seed(mode, alphas):
    mix, cut, minmax = alphas
    kw = dict(mixup_alpha=mix, cutmix_alpha=cut, cutmix_minmax=minmax, mode=mode, prob=0.8)
    mine, reference = ours(seed=3, **kw), timms(**kw)
    np.random.seed(3)  # timm draws from the global stream
    for step in range(6):  # several batches: the streams stay in step
        images, labels = batch(seed=step)
        want_images, want_targets = reference(images.clone(), labels.clone())
        got_images, got_targets = mine(images.clone(), labels.clone())
        torch.testing.assert_close(got_images, want_images, rtol=0, atol=1e-6)
        torch.testing.assert_close(got_targets, want_targets, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["batch", "elem"])
def test_targets_sum_to_one_and_follow_the_mixing_weights(mode):
    mixer = ours(seed=1, cutmix_alpha=0.0, mode=mode)  # mixup only: the pixel weight is the label weight
    for step in range(5):
        images, labels = batch(seed=step)
        mixed, targets = mixer(images.clone(), labels)
        torch.testing.assert_close(targets.sum(1), torch.ones(len(labels)))
        # Recover each sample's weight from its pixels: mixed = lam * x + (1 - lam) * mirror.
        x, mirror = images.flatten(1), images.flip(0).flatten(1)
        lam = ((mixed.flatten(1) - mirror) * (x - mirror)).sum(1) / ((x - mirror) ** 2).sum(1)
        on, off = 1 - 0.1 + 0.1 / CLASSES, 0.1 / CLASSES
        own = targets[torch.arange(len(labels)), labels]
        partner = labels.flip(0)
        expected = lam * on + (1 - lam) * off + torch.where(partner == labels, (1 - lam) * (on - off), 0)
        torch.testing.assert_close(own, expected, rtol=0, atol=1e-5)


def test_cutmix_boxes_have_the_area_the_targets_say():
    mixer = ours(seed=2, mixup_alpha=0.0, mode="elem", label_smoothing=0.0)
    h, w = 20, 24
    for step in range(5):
        images, labels = batch(seed=step, size=(3, h, w))
        labels = torch.arange(len(labels)) % CLASSES  # partners' labels differ: the own weight is readable
        labels[len(labels) // 2:] = (labels[:len(labels) // 2].flip(0) + 1) % CLASSES
        mixed, targets = mixer(images.clone(), labels)
        copied = (mixed != images).any(1).flatten(1).sum(1).float()  # pixels taken from the mirror image
        own = targets[torch.arange(len(labels)), labels]
        torch.testing.assert_close(copied / (h * w), 1 - own, rtol=0, atol=1e-6)
        assert (copied > 0).any()


def test_cutmix_alone_keeps_pixel_batches_in_bytes_and_mixup_blends_them_unrounded():
    pixels = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    labels = torch.arange(8) % CLASSES
    cut, _ = ours(seed=0, mixup_alpha=0.0)(pixels, labels)
    assert cut.dtype == torch.uint8
    blended, _ = ours(seed=0, cutmix_alpha=0.0)(pixels, labels)
    assert blended.dtype == torch.float32 and not torch.equal(blended, blended.round())


def test_mixup_off_epoch_turns_mixing_off():
    cfg = TrainConfig(mixup=0.8, cutmix=1.0, mixup_off_epoch=2, label_smoothing=0.1)
    augment = BatchAugment.from_config(cfg, num_classes=CLASSES, mean=MEAN, std=STD, pixels=False, seed=0)
    images, labels = batch()
    augment.set_epoch(1)
    mixed, targets = augment(images.clone(), labels)
    assert not torch.equal(mixed, images)
    augment.set_epoch(2)
    same, targets = augment(images.clone(), labels)
    assert torch.equal(same, images)
    torch.testing.assert_close(targets.argmax(1), labels)
    torch.testing.assert_close(targets.max(1).values, torch.full((8,), 0.9 + 0.1 / CLASSES))


@pytest.mark.parametrize("mode", ["const", "pixel", "rand"])
@pytest.mark.parametrize("count", [1, 3])
def test_erasing_erases_timms_boxes(mode, count):
    images = torch.rand(16, 3, 30, 26) + 1  # nothing near the fills (0, or normal noise at exactly these values)
    reference = TimmErasing(0.6, mode=mode, max_count=count, device="cpu")
    random.seed(5)
    want = reference(images.clone())
    got = RandomErasing(0.6, mode, count, mean=MEAN, std=STD, pixels=False, rng=random.Random(5))(images.clone())
    assert torch.equal(got != images, want != images)  # the same pixels erased
    if mode == "const":
        assert torch.equal(got, want)


def test_erasing_counts_follow_reprob_and_recount():
    erasing = RandomErasing(0.25, "const", 3, mean=MEAN, std=STD, pixels=False, rng=random.Random(0))
    boxes = erasing.boxes(4000, 224, 224)
    per_sample = (boxes[:, :, 1] > 0).sum(1)
    erased = per_sample > 0
    assert abs(erased.mean() - 0.25) < 4 * np.sqrt(0.25 * 0.75 / 4000)
    counts = np.bincount(per_sample[erased], minlength=4)[1:]  # boxes drawn in 1..3, each a third of the time
    assert counts.sum() == erased.sum() and np.all(np.abs(counts / counts.sum() - 1 / 3) < 0.06)
    areas = (boxes[..., 1] * boxes[..., 3])[boxes[..., 1] > 0] / (224 * 224)
    assert 0.005 < areas.min() and areas.max() < 0.4  # 2%..1/3 of the image over the count, rounded


def test_pixel_input_sees_what_normalized_input_sees():
    """Erasing and mixup on uint8 pixels, then the normalization the model folds in, equal the same augmentation on
    the normalized batch (same draws, same noise)."""
    cfg = TrainConfig(mixup=0.8, cutmix=1.0, reprob=0.9, remode="pixel", recount=2, mixup_mode="elem")
    pixels = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    labels = torch.arange(8) % CLASSES
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    results = []
    for as_pixels, images in ((True, pixels), (False, (pixels / 255 - mean) / std)):
        augment = BatchAugment.from_config(cfg, num_classes=CLASSES, mean=MEAN, std=STD, pixels=as_pixels, seed=4)
        torch.manual_seed(0)
        results.append(augment(images, labels))
    (on_pixels, targets_p), (on_normalized, targets_n) = results
    torch.testing.assert_close((on_pixels / 255 - mean) / std, on_normalized, rtol=0, atol=1e-4)
    torch.testing.assert_close(targets_p, targets_n)


def test_the_streams_resume_exactly_from_their_state():
    cfg = TrainConfig(mixup=0.8, cutmix=1.0, reprob=0.5, mixup_mode="elem")

    def make():
        return BatchAugment.from_config(cfg, num_classes=CLASSES, mean=MEAN, std=STD, pixels=False, seed=9)

    images, labels = batch()
    first = make()
    first(images, labels)
    state = first.state_dict()
    torch.manual_seed(1)
    want = first(images, labels)
    second = make()
    second.load_state_dict(state)
    torch.manual_seed(1)
    got = second(images, labels)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    torch.manual_seed(1)
    assert not torch.equal(make()(images, labels)[0], want[0])  # the state mattered


def test_nothing_is_built_when_no_flag_asks():
    assert BatchAugment.from_config(TrainConfig(), num_classes=CLASSES, mean=MEAN, std=STD, pixels=True,
                                    seed=0) is None


def test_draws_reach_an_accelerator_from_page_locked_memory(monkeypatch):
    """For an accelerator the draws are copied from pinned memory (from pageable memory the driver may wait for the
    stream first); on the CPU they stay the array itself, no copy. Pinning needs an accelerator: here a stand-in
    pin_memory records the call, and the meta device stands for one."""
    from trainlib.batch_augment import host_source, to_device

    pinned = []

    def pin_memory(self):
        pinned.append(self.data_ptr())
        return self.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    draws = np.arange(12, dtype=np.int64).reshape(3, 4)
    on_cpu = to_device(draws, torch.device("cpu"))
    assert pinned == [] and on_cpu.data_ptr() == draws.ctypes.data and torch.equal(on_cpu, torch.from_numpy(draws))
    assert host_source(draws, torch.device("cuda")).data_ptr() != draws.ctypes.data  # a pinned copy
    assert pinned == [draws.ctypes.data]
    moved = to_device(draws, torch.device("meta"))
    assert moved.device.type == "meta" and moved.shape == (3, 4) and len(pinned) == 2


@pytest.mark.gpu
def test_draws_are_copied_from_pinned_memory_on_a_gpu():
    from trainlib.batch_augment import host_source, to_device

    draws = np.arange(12, dtype=np.int64).reshape(3, 4)
    assert host_source(draws, torch.device("cuda")).is_pinned()
    assert torch.equal(to_device(draws, torch.device("cuda")).cpu(), torch.from_numpy(draws))
