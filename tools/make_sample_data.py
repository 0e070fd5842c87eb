"""Write a small ImageNet-style ImageFolder that stands in for ImageNet in demos, tests and CPU benchmarks.

    python tools/make_sample_data.py OUT --classes 10 --train-per-class 100 --val-per-class 20

Layout: `OUT/train/<wnid>/<wnid>_<n>.JPEG`, `OUT/val/<wnid>/ILSVRC2012_val_<n>.JPEG`, plus
`OUT/sample_data.json` recording the settings. Images are random crops of real photographs that ship
inside scikit-image and matplotlib (no download), at ImageNet-like sizes with sensor-like noise and JPEG
quality 90, so decode cost and file size are close to ImageNet's. Without scikit-image the crops come from
matplotlib's photo alone (a note on stderr says so): the same classes, other bytes.

Each class carries a visual signature laid over the photo, chosen to survive RandomResizedCrop
(scale 0.08-1) and horizontal flips: a colour cast (any crop keeps it) and a plaid of two gratings at
+theta and -theta (a flip swaps them) whose period is a fraction of the image's short side. The photo is
drawn independently of the class, so the signature is the only cue. Output is byte-identical for a seed
(and the same photos).
"""
import argparse
import io
import json
import math
import multiprocessing
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from tqdm import tqdm

from pipeline.shards import atomicio

SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina",
                  "immunohistochemistry", "camera", "grass", "gravel", "brick")
MATPLOTLIB_PHOTOS = ("grace_hopper.jpg",)
ASPECTS = (1.0, 5 / 4, 4 / 3, 3 / 2, 16 / 9)  # the common ImageNet shapes
MARKER = "sample_data.json"


@dataclass(frozen=True)
class Settings:
    classes: int = 10  # number of class folders
    train_per_class: int = 100  # images per class in train/
    val_per_class: int = 20  # images per class in val/
    seed: int = 0  # same seed -> same bytes
    min_side: int = 300  # shorter side is at least this (px)
    max_side: int = 640  # longer side is at most this (px)
    quality: int = 90  # JPEG quality; ImageNet's files are mostly around 90
    noise: float = 6.0  # sensor noise sigma in 8-bit levels at mid-grey


class UsageError(Exception):
    """A problem with the command line or the output folder: reported in one line, exit status 2."""


class NoPhotos(Exception):
    """matplotlib, which ships the photo every run uses, is missing: reported in one line, exit status 1."""


def wnids(num_classes: int, seed: int) -> list:
    """Sorted WordNet-like ids (`n01234567`), so class index == ImageFolder label."""
    ids = random.Random(seed).sample(range(1_000_000, 16_000_000), num_classes)
    return sorted(f"n{i:08d}" for i in ids)


def class_signature(label: int, seed: int) -> dict:
    """Colour gains and plaid parameters of one class."""
    rng = np.random.default_rng([seed, 1, label])
    # Golden-ratio steps spread hues evenly however many classes there are.
    hue = (label * 0.6180339887 + rng.uniform(0, 0.05)) % 1.0
    rgb = np.array([math.cos(2 * math.pi * (hue - k / 3)) for k in range(3)], dtype=np.float32)
    return {
        "tint": (1.0 + 0.45 * rgb).astype(np.float32),
        "theta": float(rng.uniform(0, math.pi / 2)),
        "periods": float(rng.uniform(4, 12)),  # grating periods across the short side
        "amplitude": float(rng.uniform(10, 18)),  # in 8-bit levels
    }


_PHOTOS = []


def has_skimage() -> bool:
    """Whether scikit-image's photos join matplotlib's; without them the same seed gives other images."""
    try:
        import skimage.data  # noqa: F401
    except ImportError:
        return False
    return True


def load_photos() -> list:
    """The source photographs as RGB PIL images (loaded once per process)."""
    if _PHOTOS:
        return _PHOTOS
    try:
        import matplotlib.cbook
    except ImportError:
        raise NoPhotos("matplotlib is not installed; the source photos are its own and scikit-image's: "
                       "pip install matplotlib scikit-image") from None
    if has_skimage():
        import skimage.data
        for name in SKIMAGE_PHOTOS:
            _PHOTOS.append(Image.fromarray(getattr(skimage.data, name)()).convert("RGB"))
        _PHOTOS.append(Image.fromarray(skimage.data.stereo_motorcycle()[0]).convert("RGB"))
    for name in MATPLOTLIB_PHOTOS:
        with Image.open(matplotlib.cbook.get_sample_data(name, asfileobj=False)) as im:
            _PHOTOS.append(im.convert("RGB"))
    return _PHOTOS


def output_size(rng, s: Settings) -> tuple:
    """(width, height) with short side >= min_side, long side <= max_side and an ImageNet-like shape."""
    aspect = min(rng.choice(ASPECTS), s.max_side / s.min_side)
    long_side = int(rng.integers(math.ceil(s.min_side * aspect), s.max_side + 1))
    short_side = max(s.min_side, round(long_side / aspect))
    return (long_side, short_side) if rng.random() < 0.75 else (short_side, long_side)


def photo_crop(rng, size: tuple) -> np.ndarray:
    """A random crop of a random photo with the aspect of `size`, resized to `size`, as float32 HxWx3."""
    photo = load_photos()[int(rng.integers(len(load_photos())))]
    pw, ph = photo.size
    w, h = size
    frac = rng.uniform(0.6, 1.0)  # of the largest crop with this aspect that fits the photo
    cw = min(pw, ph * w / h) * frac
    ch = cw * h / w
    x0, y0 = rng.uniform(0, pw - cw), rng.uniform(0, ph - ch)
    im = photo.resize(size, Image.Resampling.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch))
    # The source photos are small, so crops get upscaled and soft; sharpening restores the fine detail
    # that makes ImageNet's JPEGs ~0.5 bytes/pixel (and their decode cost) instead of half that.
    im = im.filter(ImageFilter.UnsharpMask(radius=2, percent=200, threshold=0))
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(im, dtype=np.float32)


def plaid(rng, sig: dict, size: tuple) -> np.ndarray:
    """Two gratings at +theta and -theta; a horizontal flip maps the pattern onto itself (up to phase)."""
    w, h = size
    k = 2 * math.pi * sig["periods"] / min(w, h)
    x = np.arange(w, dtype=np.float32)[None, :]
    y = np.arange(h, dtype=np.float32)[:, None]
    c, s = math.cos(sig["theta"]) * k, math.sin(sig["theta"]) * k
    phase = rng.uniform(0, 2 * math.pi, 2)
    return (0.5 * sig["amplitude"]) * (np.cos(c * x + s * y + phase[0]) + np.cos(c * x - s * y + phase[1]))


def render(job: tuple, s: Settings) -> bytes:
    """The JPEG bytes of one image; `job` = (split_id, label, index)."""
    rng = np.random.default_rng([s.seed, 2, *job])
    sig = class_signature(job[1], s.seed)
    size = output_size(rng, s)
    img = photo_crop(rng, size)
    # Colour grading: half of each pixel becomes its brightness times the class tint, so the cast
    # survives any crop whatever the photo's own colours; the share varies so it is not an exact cue.
    share = rng.uniform(0.4, 0.6)
    img = (1.0 - share) * img + share * img.mean(axis=2, keepdims=True) * sig["tint"]
    img += plaid(rng, sig, size)[:, :, None]
    # Shot noise grows with brightness (sqrt); a small chroma part makes it look like a sensor's.
    sigma = s.noise * np.sqrt(np.clip(img, 1.0, 255.0) / 128.0)
    noise = rng.standard_normal(img.shape[:2], dtype=np.float32)[:, :, None]
    noise = noise + 0.35 * rng.standard_normal(img.shape, dtype=np.float32)
    img += sigma * noise
    out = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=s.quality)
    return out.getvalue()


def plan(s: Settings, out: Path) -> list:
    """(path, job) for every image, in a fixed order."""
    names = wnids(s.classes, s.seed)
    # ImageNet's val ids are spread over classes; a seeded permutation does the same.
    val_ids = list(range(1, s.classes * s.val_per_class + 1))
    random.Random(s.seed).shuffle(val_ids)
    todo = []
    for label, wnid in enumerate(names):
        for i in range(s.train_per_class):
            todo.append((out / "train" / wnid / f"{wnid}_{i + 1}.JPEG", (0, label, i)))
        for i in range(s.val_per_class):
            val_id = val_ids[label * s.val_per_class + i]
            todo.append((out / "val" / wnid / f"ILSVRC2012_val_{val_id:08d}.JPEG", (1, label, i)))
    return todo


def _work(item):
    path, job, s = item
    data = render(job, s)
    # Temp name + rename: an interrupted run never leaves a truncated JPEG under a real name.
    atomicio.write_bytes(path, data, fsync=False)
    return len(data)


def _ignore_sigint():
    # Ctrl-C goes to the whole process group; only the parent handles it, then ends the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run(items: list, workers: int):
    """Yield each image's size in order, in-process or from a pool."""
    if workers <= 1:
        yield from map(_work, items)
        return
    with multiprocessing.Pool(workers, initializer=_ignore_sigint) as pool:
        yield from pool.imap(_work, items, chunksize=8)


def prepare_out(out: Path, overwrite: bool) -> None:
    existing = [p for p in (out / "train", out / "val") if p.exists() and any(p.iterdir())]
    if existing and not overwrite:
        raise UsageError(f"{out} already holds train/ or val/; pass --overwrite to replace them")
    if existing and not (out / MARKER).exists():
        raise UsageError(f"{out} holds train/ or val/ not made by this tool ({MARKER} missing); "
                         "refusing to delete them")
    for p in existing:
        shutil.rmtree(p)


def generate(s: Settings, out: Path, workers: int, overwrite: bool = False) -> dict:
    """Write the whole folder; returns a summary dict."""
    prepare_out(out, overwrite)
    todo = plan(s, out)
    for d in {p.parent for p, _ in todo}:
        d.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    items = [(p, j, s) for p, j in todo]
    sizes = []
    try:
        with tqdm(total=len(items), unit="img", desc="sample images", dynamic_ncols=True) as bar:
            for n in _run(items, workers):
                sizes.append(n)
                bar.update(1)
    except BaseException:
        # Workers are gone by now (the pool's exit terminates them); drop their half-written files.
        for d in {p.parent for p, _ in todo}:
            atomicio.remove_temp_files(d)
        raise
    summary = {"settings": asdict(s), "classes": wnids(s.classes, s.seed), "images": len(sizes),
               "mean_bytes": sum(sizes) / max(1, len(sizes)), "seconds": time.perf_counter() - start}
    atomicio.write_json(out / MARKER, {k: summary[k] for k in ("settings", "classes", "images")})
    return summary


def build_parser() -> argparse.ArgumentParser:
    d = Settings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out", type=Path, help="output folder (gets train/ and val/)")
    p.add_argument("--classes", type=int, default=d.classes, help="number of classes")
    p.add_argument("--train-per-class", type=int, default=d.train_per_class, help="train images per class")
    p.add_argument("--val-per-class", type=int, default=d.val_per_class, help="val images per class")
    p.add_argument("--seed", type=int, default=d.seed, help="same seed gives the same bytes")
    p.add_argument("--min-side", type=int, default=d.min_side, help="shortest allowed image side (px)")
    p.add_argument("--max-side", type=int, default=d.max_side, help="longest allowed image side (px)")
    p.add_argument("--quality", type=int, default=d.quality, help="JPEG quality 1-100")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes; 1 = in-process")
    p.add_argument("--overwrite", action="store_true", help="replace train/ and val/ made by an earlier run")
    return p


def check_args(a) -> Settings:
    if a.classes < 1 or a.classes > 15_000:
        raise UsageError("--classes must be between 1 and 15000")
    if a.train_per_class < 1 or a.val_per_class < 0:
        raise UsageError("--train-per-class must be >= 1 and --val-per-class >= 0")
    if a.min_side < 16 or a.max_side < a.min_side:
        raise UsageError("need 16 <= --min-side <= --max-side")
    if not 1 <= a.quality <= 100:
        raise UsageError("--quality must be between 1 and 100")
    if a.workers < 1:
        raise UsageError("--workers must be >= 1")
    return Settings(a.classes, a.train_per_class, a.val_per_class, a.seed, a.min_side, a.max_side, a.quality)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        s = check_args(args)
        load_photos()  # here, so that a missing package is one line before any folder is touched
        if not has_skimage():
            print("make_sample_data: note: scikit-image is not installed, so every image is a crop of matplotlib's "
                  "photo (other bytes than with it for the same seed)", file=sys.stderr)
        summary = generate(s, args.out, args.workers, args.overwrite)
    except UsageError as e:
        print(f"make_sample_data: error: {e}", file=sys.stderr)
        return 2
    except NoPhotos as e:
        print(f"make_sample_data: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"make_sample_data: error: {e.strerror or e}: {e.filename or ''}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("make_sample_data: interrupted", file=sys.stderr)
        return 130
    print(json.dumps({"out": str(args.out), "images": summary["images"], "classes": s.classes,
                      "mean_kb": round(summary["mean_bytes"] / 1000, 1),
                      "seconds": round(summary["seconds"], 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
