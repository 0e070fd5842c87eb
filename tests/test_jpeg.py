"""pipeline/shards/jpeg.py: the region decoder gives the whole-image decode's pixels for the same box, on baseline,
progressive, grayscale and CMYK JPEGs, as they are and recoded, and at every DCT scale, and fails on bad bytes as
Pillow does; `recode` keeps every pixel, and lets the region decoder skip what lies outside the box unread."""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image

from pipeline.shards.jpeg import (crop_resize, decoder_available, has_restart_markers, recode, scale_denominator)
from pipeline.transforms import center_crop_box, random_resized_crop, rgb_into

# The test images are scikit-image's photos (built into VARIANTS at import, which parametrizes the tests).
photos = pytest.importorskip("skimage.data", reason="scikit-image is not installed: its photos are the test images")

region_built = pytest.mark.skipif(not decoder_available("region"),
                                  reason="the region decoder is not built (no libjpeg headers at install)")


def pixels(*args) -> np.ndarray:
    image = crop_resize(*args)
    out = np.empty((image.size[1], image.size[0], 3), np.uint8)
    rgb_into(image, out)
    return out.astype(int)


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
if decoder_available("region"):  # the same images with a restart marker after every MCU, as make_shards stores them
    VARIANTS.update({f"{name}, recoded": recode(data) for name, data in list(VARIANTS.items()) if name != "cmyk"})


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@region_built
@pytest.mark.parametrize("name", list(VARIANTS))
def test_region_decode_matches_the_whole_image_decode(name):
    data, diffs = VARIANTS[name], []
    for seed in range(40):
        box_of = lambda w, h, seed=seed: random_resized_crop(w, h, random.Random(seed))  # noqa: E731
        region = pixels(data, box_of, 224, Image.BILINEAR, "region")
        whole = pixels(data, box_of, 224, Image.BILINEAR, "pillow")
        assert region.shape == whole.shape == (224, 224, 3)
        diffs.append(np.abs(region - whole).mean())
    val = lambda w, h: center_crop_box(w, h, 224, 0.9)  # noqa: E731
    diffs.append(np.abs(pixels(data, val, 224, Image.BICUBIC, "region")
                        - pixels(data, val, 224, Image.BICUBIC, "pillow")).mean())
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
    region = pixels(data, lambda w, h: box, 224, Image.BICUBIC, "region")
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
    with pytest.raises(OSError):  # no JPEG header left: UnidentifiedImageError, or "cannot load" (Pillow >= 13)
        crop_resize(data[:300] + bytes(2000) + data[2300:], whole, 224, Image.BILINEAR, decoder)


@region_built
def test_a_cut_below_the_box_is_not_read_by_the_region_decoder():
    # Documented: the region decoder stops below the box, so it never meets the missing rows; Pillow decodes all.
    cut = VARIANTS["baseline"][:len(VARIANTS["baseline"]) * 2 // 3]
    top = lambda w, h: (0, 0, w, h // 5)  # noqa: E731
    assert crop_resize(cut, top, 64, Image.BILINEAR, "region").size == (64, 64)
    with pytest.raises(OSError, match="truncated"):
        crop_resize(cut, top, 64, Image.BILINEAR, "pillow")


@region_built
def test_region_decoder_reports_cmyk_for_pillow_and_rejects_a_box_outside():
    from pipeline.shards import _jpegregion
    assert _jpegregion.decode_region(VARIANTS["cmyk"], 0, 0, 10, 10, 1) is None
    with pytest.raises(ValueError, match="outside"):
        _jpegregion.decode_region(VARIANTS["baseline"], 600, 0, 10, 10, 1)
    pixels, x0, y0, width, height = _jpegregion.decode_region(VARIANTS["baseline"], 101, 50, 30, 20, 1)
    assert x0 <= 101 and x0 + width >= 131 and (y0, height) == (50, 20) and len(pixels) == width * height * 3
    rgbx = _jpegregion.decode_region(VARIANTS["baseline"], 101, 50, 30, 20, 1, 4)[0]
    assert len(rgbx) == width * height * 4 and rgbx[0::4] == pixels[0::3] and rgbx[2::4] == pixels[2::3]
    with pytest.raises(ValueError, match="channels must be 3 or 4, got 2"):
        _jpegregion.decode_region(VARIANTS["baseline"], 0, 0, 10, 10, 1, 2)


def test_without_the_extension_auto_decodes_with_pillow_and_region_is_refused(monkeypatch):
    import pipeline.shards.jpeg
    from pipeline.host import HostOptions
    monkeypatch.setattr(pipeline.shards.jpeg, "_jpegregion", None)
    assert HostOptions().resolved_decoder == "pillow"
    HostOptions().validate()
    with pytest.raises(ValueError, match="decoder 'region' is not built"):
        HostOptions(decoder="region").validate()
    data = VARIANTS["baseline"]
    box = lambda w, h: (10, 20, 300, 200)  # noqa: E731
    assert crop_resize(data, box, 64, Image.BILINEAR, "region").size == (64, 64)  # falls back, same output


@region_built
@pytest.mark.parametrize("name", [n for n in VARIANTS if "recoded" not in n])
def test_recode_keeps_every_pixel_and_adds_restart_markers(name):
    data = VARIANTS[name]
    recoded = recode(data)
    assert not has_restart_markers(data)
    if name == "cmyk":  # libjpeg cannot re-encode it as RGB; make_shards converts CMYK to RGB before
        assert recoded == data
        return
    assert has_restart_markers(recoded)
    assert np.array_equal(decode(recoded), decode(data))
    assert len(recoded) < 1.2 * len(data)  # a marker per MCU (2-3 bytes), Huffman tables fitted to the image


@region_built
def test_recode_rejects_bad_bytes():
    data = VARIANTS["baseline"]
    with pytest.raises(ValueError, match="truncated"):
        recode(data[:len(data) // 2])
    with pytest.raises(ValueError):
        recode(data[:300] + bytes(2000) + data[2300:])


@region_built
@pytest.mark.parametrize("name", ["baseline", "grayscale", "odd size"])
def test_a_recoded_file_gives_the_decoder_only_the_box_mcus(name):
    from pipeline.shards import _jpegregion
    data = VARIANTS[f"{name}, recoded"]
    width, height = Image.open(io.BytesIO(data)).size
    x, y, w, h = width * 3 // 4, height * 3 // 4, 100, 80  # a box in the bottom-right corner
    cut, x0, y0 = _jpegregion.region_jpeg(data, x, y, w, h, 1)
    assert len(cut) < len(data) / 8  # the box's MCUs: about 1/20 of the image
    part = decode(cut).astype(int)
    assert x0 <= x and y0 <= y and x0 + part.shape[1] >= min(x + w, width) and y0 + part.shape[0] >= y + h
    assert np.abs(part - decode(data)[y0:y0 + part.shape[0], x0:x0 + part.shape[1]]).mean() < 1.0
    assert _jpegregion.region_jpeg(VARIANTS[name], x, y, w, h, 1) is None  # not recoded: decoded as it is
    with pytest.raises(TypeError):  # no channels: the cut is a JPEG, not pixels
        _jpegregion.region_jpeg(data, x, y, w, h, 1, 4)


@region_built
def test_a_recoded_file_with_a_marker_out_of_sequence_or_cut_short_is_left_to_libjpeg():
    from pipeline.shards import _jpegregion
    data = VARIANTS["baseline, recoded"]
    at = data.index(b"\xff\xd3")  # the marker after the fourth MCU: renumbered, as a lost marker would leave it
    shifted = data[:at] + b"\xff\xd5" + data[at + 2:]
    box = (200, 200, 100, 100)
    assert _jpegregion.region_jpeg(shifted, *box, 1) is None
    assert np.abs(pixels(shifted, lambda w, h: box, 64, Image.BILINEAR, "region")
                  - pixels(data, lambda w, h: box, 64, Image.BILINEAR, "region")).mean() < 1.0  # libjpeg resyncs
    cut = data[:len(data) // 2]
    assert crop_resize(cut, lambda w, h: (0, 0, w, h // 3), 64, Image.BILINEAR, "region").size == (64, 64)
    with pytest.raises(ValueError, match="truncated"):  # a box that reaches the cut
        crop_resize(cut, lambda w, h: (0, h // 2, w, h // 2), 64, Image.BILINEAR, "region")


@region_built
def test_a_recoded_region_has_the_whole_decode_pixels_at_every_scale():
    from pipeline.shards import _jpegregion
    data = VARIANTS["large, recoded"]
    for denom in (1, 2, 4, 8):
        reference = np.asarray(_scaled(data, denom))
        side = 1000 // denom
        for x, y, w, h in ((101, 50, 30, 20), (0, 0, 7, 9), (3, 90, 60, 20), (side - 20, side - 9, 20, 9)):
            out, x0, y0, width, height = _jpegregion.decode_region(data, x, y, w, h, denom, 4)
            assert x0 <= x and y0 <= y and x0 + width >= min(x + w, side) and y0 + height >= y + h
            got = np.frombuffer(out, np.uint8).reshape(height, width, 4)[..., :3].astype(int)  # RGBX
            assert np.abs(got - reference[y0:y0 + height, x0:x0 + width]).mean() < 1.0, (denom, x, y)


def _scaled(data: bytes, denom: int) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.draft("RGB", (im.size[0] // denom, im.size[1] // denom))
    return im.convert("RGB")


@region_built
def test_rgb_and_rgbx_rows_give_the_same_crop(monkeypatch):
    import pipeline.shards.jpeg
    box = lambda w, h: (37.5, 20.25, 300.0, 250.5)  # noqa: E731
    out = {}
    for mode in ("RGB", "RGBX"):  # RGBX under Pillow-SIMD, RGB under stock Pillow
        monkeypatch.setattr(pipeline.shards.jpeg, "REGION_MODE", mode)
        out[mode] = pixels(VARIANTS["baseline, recoded"], box, 224, Image.BILINEAR, "region")
    assert np.array_equal(out["RGB"], out["RGBX"])
