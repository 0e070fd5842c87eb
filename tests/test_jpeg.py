"""pipeline/jpeg.py: the region decoder gives the whole-image decode's pixels for the same box, on baseline,
progressive, grayscale and CMYK JPEGs and at every DCT scale, and fails on bad bytes as Pillow does."""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image, UnidentifiedImageError
from skimage import data as photos

from pipeline.contract import center_crop_box, random_resized_crop
from pipeline.jpeg import crop_resize, scale_denominator

region_built = pytest.mark.skipif(not __import__("pipeline.jpeg").jpeg.decoder_available("region"),
                                  reason="the region decoder is not built (no libjpeg headers at install)")


def jpeg(image: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def variants() -> dict[str, bytes]:
    coffee = Image.fromarray(photos.coffee())  # 600 x 400, like an ImageNet photo
    astronaut = Image.fromarray(photos.astronaut()).resize((1000, 1000))  # room for 1/2 and 1/4 scale decodes
    return {"baseline": jpeg(coffee), "progressive": jpeg(coffee, progressive=True),
            "4:4:4": jpeg(coffee, subsampling=0), "grayscale": jpeg(coffee.convert("L")),
            "cmyk": jpeg(coffee.convert("CMYK")), "large": jpeg(astronaut),
            "odd size": jpeg(coffee.crop((0, 0, 597, 389)))}


VARIANTS = variants()


@region_built
@pytest.mark.parametrize("name", list(VARIANTS))
def test_region_decode_matches_the_whole_image_decode(name):
    data, diffs = VARIANTS[name], []
    for seed in range(40):
        box_of = lambda w, h, seed=seed: random_resized_crop(w, h, random.Random(seed))  # noqa: E731
        region = crop_resize(data, box_of, 224, Image.BILINEAR, "region").astype(int)
        whole = crop_resize(data, box_of, 224, Image.BILINEAR, "pillow").astype(int)
        assert region.shape == whole.shape == (224, 224, 3)
        diffs.append(np.abs(region - whole).mean())
    val = lambda w, h: center_crop_box(w, h, 224, 0.9)  # noqa: E731
    diffs.append(np.abs(crop_resize(data, val, 224, Image.BICUBIC, "region").astype(int)
                        - crop_resize(data, val, 224, Image.BICUBIC, "pillow").astype(int)).mean())
    assert max(diffs) <= 2.0, diffs  # grey levels per pixel, on average over one image


def test_the_dct_scale_keeps_the_box_at_least_the_output_size():
    assert scale_denominator(447, 900, 224) == 1
    assert scale_denominator(448, 900, 224) == 2
    assert scale_denominator(900, 1800, 224) == 4
    assert scale_denominator(4000, 4000, 224) == 8
    assert scale_denominator(4000, 4000, 32) == 8  # 1/8 is libjpeg's smallest


@region_built
def test_val_boxes_decode_at_a_reduced_scale_and_still_match():
    # 1000 px: val's box (shorter side to 248, centre 224: 903 px of source) decodes at 1/4 (226 px).
    data = VARIANTS["large"]
    box = center_crop_box(1000, 1000, 224, 0.9)
    assert scale_denominator(box[2], box[3], 224) == 4
    region = crop_resize(data, lambda w, h: box, 224, Image.BICUBIC, "region").astype(int)
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize(
        (224, 224), Image.BICUBIC, box=(box[0], box[1], box[0] + box[2], box[1] + box[3]))).astype(int)
    assert np.abs(region - reference).mean() <= 2.0  # a full-resolution decode, not only the same scaled one


@region_built
@pytest.mark.parametrize("decoder", ["region", "pillow"])
def test_bad_bytes_raise_and_a_cut_inside_the_box_is_an_error(decoder):
    data = VARIANTS["baseline"]
    whole = lambda w, h: (0, 0, w, h)  # noqa: E731
    with pytest.raises((ValueError, OSError), match="truncated"):  # libjpeg's ValueError, Pillow's OSError
        crop_resize(data[:len(data) // 2], whole, 224, Image.BILINEAR, decoder)
    with pytest.raises(UnidentifiedImageError):  # no JPEG header left
        crop_resize(data[:300] + bytes(2000) + data[2300:], whole, 224, Image.BILINEAR, decoder)


@region_built
def test_a_cut_below_the_box_is_not_read_by_the_region_decoder():
    # Documented: the region decoder stops below the box, so it never meets the missing rows; Pillow decodes all.
    cut = VARIANTS["baseline"][:len(VARIANTS["baseline"]) * 2 // 3]
    top = lambda w, h: (0, 0, w, h // 5)  # noqa: E731
    assert crop_resize(cut, top, 64, Image.BILINEAR, "region").shape == (64, 64, 3)
    with pytest.raises(OSError, match="truncated"):
        crop_resize(cut, top, 64, Image.BILINEAR, "pillow")


@region_built
def test_region_decoder_reports_cmyk_for_pillow_and_rejects_a_box_outside():
    from pipeline import _jpegregion
    assert _jpegregion.decode_region(VARIANTS["cmyk"], 0, 0, 10, 10, 1) is None
    with pytest.raises(ValueError, match="outside"):
        _jpegregion.decode_region(VARIANTS["baseline"], 600, 0, 10, 10, 1)
    pixels, x0, y0, width, height = _jpegregion.decode_region(VARIANTS["baseline"], 101, 50, 30, 20, 1)
    assert x0 <= 101 and x0 + width >= 131 and (y0, height) == (50, 20) and len(pixels) == width * height * 3


def test_without_the_extension_auto_decodes_with_pillow_and_region_is_refused(monkeypatch):
    import pipeline.jpeg
    from pipeline.host import HostOptions
    monkeypatch.setattr(pipeline.jpeg, "_jpegregion", None)
    assert HostOptions().resolved_decoder == "pillow"
    HostOptions().validate()
    with pytest.raises(ValueError, match="decoder 'region' is not built"):
        HostOptions(decoder="region").validate()
    data = VARIANTS["baseline"]
    box = lambda w, h: (10, 20, 300, 200)  # noqa: E731
    assert crop_resize(data, box, 64, Image.BILINEAR, "region").shape == (64, 64, 3)  # falls back, same output
