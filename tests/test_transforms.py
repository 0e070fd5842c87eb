"""pipeline/transforms.py: the policy (crop boxes, flips), a worker's rows into its slot, the model-input conversion
(one pass on the CPU, the same bits as torch's chain) and the freed-memory setting it relies on."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.loader import LoaderSpec
from pipeline.transforms import Transform, rgb_into, to_model_input


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's malloc is what is tuned")
def test_cpu_float_batches_reuse_freed_memory_instead_of_fresh_pages():
    # A 64 x 224 px float batch is 38.5 MB; without keep_freed_memory_in_the_heap every batch would be new pages
    # that the kernel zero-fills on first touch (~9,400 minor page faults a batch).
    import subprocess
    import sys
    script = """
import resource, sys, torch
from pipeline.loader import LoaderSpec
from pipeline.transforms import Transform, rgb_into, to_model_input
torch.set_num_threads(1)
spec = LoaderSpec(data_path="x", split="train", batch_size=64, img_size=224, device=torch.device("cpu"),
                  dtype=torch.float32)
pixels = torch.zeros((64, 224, 224, 3), dtype=torch.uint8)
kept = [to_model_input(pixels, spec, nhwc=True)]
for _ in range(20):  # the heap grows to hold the batches alive at once
    kept = kept[-1:] + [to_model_input(pixels, spec, nhwc=True)]
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    kept = kept[-1:] + [to_model_input(pixels, spec, nhwc=True)]  # the consumer holds the last batch
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    faults = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                                cwd=str(__import__("pathlib").Path(__file__).resolve().parent.parent)).stdout)
    assert faults < 9_400, faults  # fresh pages would be 94,000 (measured: 0 once the heap has grown)


pixels_built = pytest.mark.skipif(__import__("pipeline.transforms").transforms._pixels is None,
                                  reason="pipeline._pixels is not built (no C compiler at install)")


@pixels_built
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_one_pass_gives_the_same_bits_as_torch(monkeypatch, dtype, channels_last):
    import pipeline.transforms as transforms

    spec = LoaderSpec(data_path="x", split="train", batch_size=3, img_size=0, device=torch.device("cpu"),
                      mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), dtype=dtype, channels_last=channels_last)
    pixels = torch.randint(0, 256, (3, 17, 13, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    fast = to_model_input(pixels, spec, nhwc=True)
    monkeypatch.setattr(transforms, "_pixels", None)
    chain = to_model_input(pixels, spec, nhwc=True)
    assert fast.dtype == chain.dtype == dtype and fast.shape == (3, 3, 17, 13)
    assert fast.stride() == chain.stride() and torch.equal(fast, chain)
    if dtype != torch.uint8:  # and the chain is the contract: red channel, (x - 255 mean) / (255 std)
        assert torch.allclose(fast[:, 0].float(), (pixels[..., 0].float() / 255 - 0.485) / 0.229, atol=1e-2)


@pixels_built
def test_cpu_one_pass_rejects_wrong_buffers():
    from pipeline import _pixels

    pixels = torch.zeros((2, 4, 4, 3), dtype=torch.uint8).numpy()
    with pytest.raises(ValueError, match="want N x 16 x 3 pixels and as many outputs"):
        _pixels.normalize(pixels, torch.empty(95).numpy(), 16, (0, 0, 0), (1, 1, 1), True)
    with pytest.raises(ValueError, match="want N x 5 x 3 pixels"):  # 96 bytes are not whole images of 5 pixels
        _pixels.planar(pixels, torch.empty(96, dtype=torch.uint8).numpy(), 5)
    with pytest.raises(ValueError, match="want uint8 pixels into a 'f' buffer, got 'B' into 'd'"):
        _pixels.normalize(pixels, torch.empty(96, dtype=torch.float64).numpy(), 16, (0, 0, 0), (1, 1, 1), True)
    with pytest.raises(ValueError, match="pixels must be > 0"):
        _pixels.planar(pixels, pixels.copy(), 0)
    with pytest.raises(BufferError):  # a read-only output
        _pixels.planar(pixels, bytes(96), 16)


@pytest.mark.parametrize("mode", ["RGB", "RGBX"])
@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("kernel", ["built", "absent"])
def test_rgb_into_writes_the_rows_mirrored_on_request(monkeypatch, mode, flip, kernel):
    import pipeline.transforms
    if kernel == "absent":
        monkeypatch.setattr(pipeline.transforms, "_pixels", None)
    elif pipeline.transforms._pixels is None:
        pytest.skip("pipeline._pixels is not built (no C compiler at install)")
    rgb = np.random.default_rng(0).integers(0, 256, (5, 4 * 9 + 3, 3), dtype=np.uint8)  # widths past the 4-pixel blocks
    for width in (1, 5, 6, 7, 11, 39):
        image = Image.fromarray(np.ascontiguousarray(rgb[:, :width])).convert(mode)
        out = np.zeros((5, width, 3), np.uint8)
        rgb_into(image, out, flip)
        assert np.array_equal(out, rgb[:, :width][:, ::-1] if flip else rgb[:, :width]), width


@pixels_built
def test_rgb_rows_rejects_rows_of_the_wrong_size():
    from pipeline import _pixels
    with pytest.raises(ValueError, match="want rows of 4 RGBX pixels into as many RGB ones, got 32 and 23 bytes"):
        _pixels.rgb_rows(bytes(32), np.zeros(23, np.uint8), 4, False)
    with pytest.raises(ValueError, match="width must be > 0"):
        _pixels.rgb_rows(bytes(32), np.zeros(24, np.uint8), 0, False)


def test_a_transform_draws_its_crop_then_its_flip_and_eval_draws_nothing():
    train, val = Transform(train=True, img_size=32, hflip=1.0), Transform(train=False, img_size=32, crop_pct=0.5)
    rng = random.Random(0)
    left, top, w, h = train.crop_box(200, 100, rng)
    assert 0 <= left and left + w <= 200 and 0 <= top and top + h <= 100 and train.flips(rng)
    assert train.interpolation == "bilinear" and val.interpolation == "bicubic" and val.eval_resize == 64
    state = rng.getstate()
    assert val.crop_box(200, 100, rng) == (100 - 25, 25, 50, 50) and not val.flips(rng)  # 100 px -> 64, 32 kept
    assert rng.getstate() == state
