"""One image's decode for the host workers: a box of the source image, resized to size x size, as an RGB(X) image; and
the lossless re-encode that makes shards whose boxes decode alone (`recode`, called by the shard writer).

Two paths with the same output geometry (the box's float coordinates, the same DCT scale, the same resampling):
  region  the C extension `pipeline.shards._jpegregion` decodes only the box's rows and iMCU columns (plus the
          resampling filter's margin) with libjpeg-turbo, and stops below the box: what a RandomResizedCrop leaves
          out is not decoded. In a recoded JPEG (a restart marker after every MCU) not even entropy-decoded: the
          rows above and the columns beside the box are skipped too. Built by `pip install -e .` where libjpeg's
          headers are (libjpeg-turbo's -dev package).
  pillow  Pillow decodes the whole image (at the same DCT scale, through `draft`) and resizes the box. Used for CMYK
          and non-JPEG files, and everywhere when the extension is not built.
Both decode at 1/2, 1/4 or 1/8 scale when the box is at least twice the output in both sides (the largest such
scale that keeps it >= size), which val's resize-then-center-crop allows more often than a train crop.
"""
from __future__ import annotations

import io
import math

import PIL
from PIL import Image

try:
    from pipeline.shards import _jpegregion
except ImportError:  # not built (no compiler or libjpeg headers at install): Pillow decodes whole images
    _jpegregion = None

DECODERS = ("region", "pillow")


def pillow_is_simd() -> bool:
    """Whether the Pillow that runs is Pillow-SIMD, which tags its versions '.postN' (its distribution's metadata can
    outlive its files when a plain Pillow is installed over it)."""
    return ".post" in PIL.__version__


# The region decoder's rows: Pillow-SIMD resizes RGBX as fast as RGB, so RGBX, which Pillow maps without a copy;
# stock Pillow resizes RGBX slower than RGB, more than the copy saves (docs/pipeline.md, "Measured figures").
REGION_MODE = "RGBX" if pillow_is_simd() else "RGB"


def decoder_available(name: str) -> bool:
    return name == "pillow" or (name == "region" and _jpegregion is not None)


def default_decoder() -> str:
    return "region" if _jpegregion is not None else "pillow"


def scale_denominator(box_w: float, box_h: float, size: int) -> int:
    """The largest JPEG DCT scale 1/d (d in 1, 2, 4, 8) at which the box still covers >= size pixels each way."""
    d = 1
    while d < 8 and min(box_w, box_h) / (2 * d) >= size:
        d *= 2
    return d


def recode(data: bytes) -> bytes:
    """The JPEG `data` re-encoded losslessly (the same DCT coefficients, so every decoder gives the same pixels) as
    baseline with optimized Huffman tables and a restart marker after every MCU, which lets the region decoder skip
    to any MCU. CMYK/YCCK JPEGs come back unchanged. Needs the extension; ValueError on bytes libjpeg rejects."""
    if _jpegregion is None:
        raise RuntimeError("recode needs the region decoder (pipeline.shards._jpegregion), which is not built")
    recoded = _jpegregion.recode(data)
    return data if recoded is None else recoded


def has_restart_markers(data: bytes) -> bool:
    """Whether `data` is a JPEG as `recode` writes them (False when the extension is not built)."""
    layout = _jpegregion.size(data) if _jpegregion is not None else None
    return bool(layout and layout[3])


def crop_resize(data: bytes, box_of, size: int, resample: int, decoder: str = "region") -> Image.Image:
    """Decode `data`, take the box `box_of(width, height) -> (left, top, w, h)` (source pixels, floats), resize it to
    size x size with `resample`: an RGB or RGBX image (RGB and a padding byte, what the region decoder hands over
    without a copy); `rgb_into` writes either one's pixels. Raises what Pillow or libjpeg raise on bad bytes."""
    if decoder == "region" and _jpegregion is not None:
        layout = _jpegregion.size(data)  # the JPEG's markers, read in C: no Image.open
        if layout is not None and layout[2] in (1, 3):  # grey or colour; CMYK/YCCK (4) go to Pillow
            width, height = layout[0], layout[1]
            left, top, w, h = box_of(width, height)
            return _region(data, width, height, (left, top, w, h), scale_denominator(w, h, size), size, resample)
    im = Image.open(io.BytesIO(data))  # reads the header only
    width, height = im.size
    left, top, w, h = box_of(width, height)
    denom = scale_denominator(w, h, size)
    if denom > 1:
        im.draft("RGB", (width // denom, height // denom))  # draft picks 1/denom for this request
    sx, sy = im.size[0] / width, im.size[1] / height
    if im.mode not in ("RGB", "L", "CMYK"):
        im = im.convert("RGB")  # palette/alpha images (a PNG named .jpg) would resize in the wrong space
    im = im.resize((size, size), resample, box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))
    return im if im.mode == "RGB" else im.convert("RGB")


def _region(data: bytes, width: int, height: int, box, denom: int, size: int, resample: int) -> Image.Image:
    # libjpeg's scaled size is ceil(side / denom), as Pillow's draft gives.
    scaled_w, scaled_h = -(-width // denom), -(-height // denom)
    sx, sy = scaled_w / width, scaled_h / height
    left, top, w, h = box
    x_lo, y_lo, x_hi, y_hi = left * sx, top * sy, (left + w) * sx, (top + h) * sy
    # The resampling filter reads up to (box / size) + 1 source pixels beyond the box: decode those too, so the
    # edges match a whole-image decode (Pillow clamps at the edge of what it is given).
    margin = math.ceil(max(x_hi - x_lo, y_hi - y_lo) / size) + 2
    x, y = max(0, math.floor(x_lo) - margin), max(0, math.floor(y_lo) - margin)
    x_end, y_end = min(scaled_w, math.ceil(x_hi) + margin), min(scaled_h, math.ceil(y_hi) + margin)
    pixels, x0, y0, rw, rh = _jpegregion.decode_region(data, x, y, x_end - x, y_end - y, denom, len(REGION_MODE))
    im = Image.frombuffer(REGION_MODE, (rw, rh), pixels, "raw", REGION_MODE, 0, 1)  # RGBX: maps the bytes, no copy
    return im.resize((size, size), resample, box=(x_lo - x0, y_lo - y0, x_hi - x0, y_hi - y0))
