"""The NVIDIA DALI backend: shards -> batches decoded by DALI, a `pipeline.loader.ShardLoader`.

On a CUDA device the JPEGs are decoded on the GPU ("mixed": nvJPEG plus the hardware JPEG engines) with the train
crop fused into the decode, resized once and handed to torch as uint8 (or normalized by DALI, see `normalize_in`).
On any other device DALI runs its CPU operators (`device_id=None`) and the batch is copied to the device; this is
the mode the CPU tests use.

Which samples go into which batch is the rule in `pipeline/plan.py`, read by the one reader
(`pipeline/shards/reader.py`): DALI's parallel external source runs `BatchSource` (pipeline/dali_reader.py,
torch-free, so a spawned reader starts fast) in `readers` worker processes, each call turning one batch of the run
into its JPEG bytes and labels, so DALI sees exactly the host backend's samples in the same order. The readers fork
where nothing forbids it and spawn beside a GPU or an NPU (`reader_start_method`). The pipeline is built once per
loader and its source runs on across epoch boundaries (epoch e+1's first batches are read and decoded while epoch
e's last steps train); it is rebuilt only when the epochs asked for stop following each other (a resume, a jump of
set_epoch, an epoch abandoned half way).

Train augmentation (`Transform.augment`, pipeline/augment.py: --aa, --color-jitter) runs in the same pipeline, on
the uint8 tiles where they are (GPU or CPU), after the crop, resize and flip and before normalization, as timm orders
it; DALI's conditionals route each sample through its own ops. From DALI's `auto_aug` ops and timm's semantics:
RandAugment with timm's op sets, arguments (each parameter is `LEVEL_TO_ARG` at its level, random signs included),
m out of 10, n layers, per-op probability p, mstd noise, mmax and weighted choice without replacement; AutoAugment
as a DALI `Policy` of timm's sub-policies (probability, magnitude per op); color jitter as torchvision's, factors
and order drawn per sample. The same distributions as the host backend, not the same draws. Where it differs:
  - op kernels are DALI's: Equalize uses OpenCV's formula, Color/Desaturate/saturation DALI's saturation (within a
    level of Pillow's blend), hue jitter a rotation in YIQ rather than an HSV shift (visibly different), GaussianBlur
    an exact Gaussian (Pillow approximates it with boxes), Sharpness sharpens the 1 px border Pillow leaves; warps
    and blends round by a level here and there;
  - warps fill with one grey level, the mean of timm's per-channel fill (DALI's fill_value is a scalar; equal for
    mean 0.5);
  - RandAugment magnitudes are quantized to 0.01 (LEVEL_STEP);
  - AutoAugment ignores -mstd: a DALI Policy's magnitudes are fixed bins;
  - TrivialAugment (ta_wide) is DALI's own `trivial_augment_wide`, which follows torchvision's TrivialAugmentWide.

Its own knobs: `DaliOptions` (docs/dali.md says what each one changed where it was measured).
"""
from __future__ import annotations

import inspect
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from pipeline.augment import LEVEL_DENOM, LEVEL_TO_ARG, Augment
from pipeline.cli import knob
from pipeline.dali_reader import BatchSource
from pipeline.loader import LoaderSpec
from pipeline.processes import main_not_replayed, own_temp_folder, stop_signals_blocked
from pipeline.shard_loader import ShardLoader
from pipeline.shards.errors import ShardError
from pipeline.transforms import Transform, to_model_input

INSTALL_HINT = "the dali backend needs NVIDIA DALI: pip install nvidia-dali-cuda130 (x86_64/aarch64 Linux)"
NORMALIZE_IN = ("torch", "dali")
START_METHODS = ("auto", "fork", "spawn")
# nvJPEG scratch sizes that fit ImageNet's largest JPEGs, so the train decoder does not reallocate mid-epoch (DALI's
# resnet50 example's). DALI reserves them per decoder thread: one device buffer and two pinned host buffers each,
# so at 8 threads 1.7 GB of GPU memory and 2.25 GB of pinned host memory per pipeline (`decoder_scratch`).
GPU_DECODER_HINTS = dict(device_memory_padding=211_025_920, host_memory_padding=140_544_512,
                         preallocate_width_hint=5_980, preallocate_height_hint=6_430)
# DALI's own defaults, for what the hints do not set: what a pipeline reserves without them.
DALI_DEFAULT_PADDING = dict(device_memory_padding=16 * 2**20, host_memory_padding=8 * 2**20)


class DaliMissingError(ImportError, RuntimeError):
    """NVIDIA DALI is not importable; the message says how to install it. A RuntimeError too, so callers that
    turn RuntimeErrors into one-line messages (pipeline.bench, train.py) print it as one."""


def import_dali() -> SimpleNamespace:
    """DALI's modules, imported only when the dali backend is asked for: the rest of the project runs without it."""
    try:
        import nvidia.dali
        import nvidia.dali.math as dali_math
        from nvidia.dali import backend, fn, pipeline_def, types
        from nvidia.dali.auto_aug import augmentations, core
        from nvidia.dali.auto_aug.auto_augment import apply_auto_augment
        from nvidia.dali.auto_aug.trivial_augment import trivial_augment_wide
        from nvidia.dali.pipeline import do_not_convert
        from nvidia.dali.plugin.pytorch import feed_ndarray
    except ImportError as e:
        raise DaliMissingError(f"{INSTALL_HINT} ({e})") from None
    return SimpleNamespace(fn=fn, types=types, math=dali_math, pipeline_def=pipeline_def, feed_ndarray=feed_ndarray,
                           backend=backend,
                           aug=augmentations, aug_core=core, apply_auto_augment=apply_auto_augment,
                           trivial_augment_wide=trivial_augment_wide,
                           do_not_convert=do_not_convert,
                           version=nvidia.dali.__version__)


def pipeline_seed(seed: int, epoch: int, rank: int) -> int:
    """One DALI seed per (run seed, first epoch, rank): crops differ across ranks and runs, and repeat."""
    return (seed * 1_000_003 + epoch * 10_007 + rank) % 2**31


def accelerator_started(dali) -> str | None:
    """What this process has started that a forked child must not inherit: the CUDA driver (DALI's own check, the
    one that makes it refuse to fork; torch.cuda.is_available() alone starts the driver) or an NPU runtime
    (torch_npu: a fork may deadlock in it). None when neither."""
    if dali.backend.IsDriverInitialized():
        return "the CUDA driver"
    npu = getattr(torch, "npu", None)  # registered by torch_npu
    if npu is not None and getattr(npu, "is_initialized", lambda: False)():
        return "an NPU runtime"
    return None


def reader_start_method(asked: str, dali, on_gpu: bool) -> str:
    """How DALI starts its reader processes. "auto": fork where nothing forbids it (a CPU pipeline in a process that
    has started no accelerator: the readers start in a fraction of a second), else spawn. An explicit "fork" that
    cannot work is a one-line ValueError, not DALI's paragraph."""
    started = accelerator_started(dali)
    if asked == "auto":
        # A GPU pipeline spawns even before CUDA starts: its own build starts it, and a second pipeline (val) would
        # then fork from a CUDA process.
        return "spawn" if on_gpu or started else "fork"
    if asked == "fork" and (started or on_gpu):
        why = f"this process has started {started}" if started else "a GPU pipeline starts CUDA in this process"
        raise ValueError(f"--dali-py-start-method fork: {why}, which forked reader processes cannot share; use spawn "
                         f"(or auto)")
    return asked


def dali_reason(error: Exception) -> str:
    """The cause out of DALI's multi-line error text: our reader's own message when a source worker raised it, else
    the operator and cause, e.g. "decoders.image: nvImageCodec failure"."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if any("traceback received from worker" in line for line in lines):
        return lines[-1].split(": ", 1)[-1] if ": " in lines[-1] else lines[-1]
    op = next((line.split("`")[1].removeprefix("nvidia.dali.fn.") for line in lines
               if line.startswith("Error in") and line.count("`") >= 2), "")
    fallback = lines[-1] if lines else type(error).__name__
    cause = next((lines[i + 1] for i, line in enumerate(lines[:-1]) if line == "encountered:"), fallback)
    return f"{op}: {cause}" if op else cause


@dataclass(frozen=True)
class DaliOptions:
    """The DALI backend's own knobs (train.py: `--dali-*`)."""

    normalize_in: str = knob("torch", "dali: torch = DALI returns uint8 and torch normalizes on the device; dali = "
                                      "DALI's crop_mirror_normalize writes the final float tensor",
                             choices=NORMALIZE_IN)
    hw_decoder_load: float = knob(0.65, "dali: share of JPEGs for the GPU's hardware JPEG decoder, the rest to "
                                        "nvJPEG's CUDA decoder (SMs); in [0, 1]")
    readers: int = knob(2, "dali: processes reading shards for DALI (its parallel external source workers)")
    py_start_method: str = knob("auto", "dali: how the reader processes start (DALI's py_start_method): auto = fork "
                                        "on a CPU pipeline in a process with no CUDA/NPU started, else spawn",
                                choices=START_METHODS)
    preallocate: bool = knob(True, "dali, GPU decode, train: reserve nvJPEG scratch for ImageNet's largest JPEG per "
                                   "decoder thread (210 MB of GPU and 2 x 140 MB of pinned host memory each), so no "
                                   "image reallocates mid-epoch; off = DALI's defaults (16 MB + 2 x 8 MB). Val "
                                   "always uses DALI's defaults")

    def validate(self) -> None:
        if self.normalize_in not in NORMALIZE_IN:
            raise ValueError(f"normalize_in must be one of {NORMALIZE_IN}, got {self.normalize_in!r}")
        if not isinstance(self.hw_decoder_load, (int, float)) or not 0.0 <= self.hw_decoder_load <= 1.0:
            raise ValueError(f"hw_decoder_load must be within [0, 1], got {self.hw_decoder_load!r}")
        if not isinstance(self.readers, int) or self.readers < 1:
            raise ValueError(f"readers must be an integer >= 1, got {self.readers!r}")
        if self.py_start_method not in START_METHODS:
            raise ValueError(f"py_start_method must be one of {START_METHODS}, got {self.py_start_method!r}")


class CudaOutput:
    """DALI on the training GPU: "mixed" decode there, and each batch copied once, device to device, on torch's
    current stream, so it lives in torch's caching allocator and DALI's buffer can go back to DALI's pool."""

    def __init__(self, device: torch.device, feed_ndarray, hw_decoder_load: float, preallocate: bool,
                 threads: int):
        self.device, self.feed, self.copied = device, feed_ndarray, None  # copied: event after the latest copy
        self.device_id = device.index if device.index is not None else torch.cuda.current_device()
        # Val decodes each image once per evaluation and stays up through training: the hints' memory is not
        # worth it there (at 8 threads, 4.5 GB of pinned host memory per rank for the two pipelines).
        self.decoder = dict(device="mixed", hw_decoder_load=hw_decoder_load,
                            **(GPU_DECODER_HINTS if preallocate else {}))
        gpu, pinned = decoder_scratch(threads, preallocate)
        self.summary = (f"mixed decode on cuda:{self.device_id}, hw_decoder_load {hw_decoder_load}, decoder scratch "
                        f"{gpu / 2**30:.2f} GiB GPU + {pinned / 2**30:.2f} GiB pinned")

    def stream(self):
        return torch.cuda.current_stream(self.device)

    def take(self, tensor, shape, dtype, stream) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype, device=self.device)
        self.feed(tensor, out, cuda_stream=stream)
        self.copied = self.copied or torch.cuda.Event()
        self.copied.record(stream)
        return out

    def drain(self) -> None:
        if self.copied is not None:
            # Sync point, once per epoch: the last copies read DALI's memory, which goes with the pipeline.
            self.copied.synchronize()


def decoder_scratch(threads: int, preallocate: bool) -> tuple[int, int]:
    """(GPU bytes, pinned host bytes) that a GPU-decoding pipeline's nvJPEG reserves up front: one device buffer and
    two pinned host buffers per decoder thread (DALI's decoders.image docs)."""
    pad = GPU_DECODER_HINTS if preallocate else DALI_DEFAULT_PADDING
    return threads * pad["device_memory_padding"], threads * 2 * pad["host_memory_padding"]


class HostOutput:
    """DALI's CPU operators (`device_id=None`): batches land in host memory (pinned when headed for an accelerator,
    so the copy does not wait for work queued there) and move to the device, if any, asynchronously."""

    device_id = None
    decoder = dict(device="cpu")

    def __init__(self, device: torch.device, feed_ndarray):
        self.device, self.feed, self.pinned = device, feed_ndarray, device.type != "cpu"
        self.summary = "cpu operators" + (f", copied to {device}" if self.pinned else "")

    def stream(self):
        return None

    def take(self, tensor, shape, dtype, stream) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype, pin_memory=self.pinned)
        self.feed(tensor, out)
        return out.to(self.device, non_blocking=True)

    def drain(self) -> None:
        pass


def augmenting(t: Transform) -> bool:
    """Whether the graph augments (train only); then it is built with DALI's conditionals, which route each sample
    through the ops drawn for it."""
    return t.train and t.augment.active


LEVEL_STEP = 0.01  # RandAugment's magnitudes: timm's levels 0..mmax in steps of 0.01 (timm's mstd draws are continuous)


class _FixedDraws:
    """The rng `LEVEL_TO_ARG` draws from when a parameter is computed ahead: the random sign stays positive (DALI
    negates the level per sample instead) and a uniform draw returns its range (the op draws in it per sample)."""

    def __init__(self, negate: bool = False):
        self.negate = negate

    def random(self) -> float:
        return 1.0 if self.negate else 0.0

    def uniform(self, lo: float, hi: float) -> tuple[float, float]:
        return lo, hi


def _posterize_mask(bits) -> np.ndarray:
    # ImageOps.posterize keeps the `bits` high bits: 0 is a black tile (DALI's own mask keeps 1), 8 the tile
    bits = min(8, max(0, int(bits)))
    return np.array(0xFF ^ (2 ** (8 - bits) - 1), np.uint8)


def _timm_op(dali, name: str, aug: Augment):
    """timm's op `name` in DALI: (its auto_aug augmentation, level -> the augmentation's parameter, None for an op
    without magnitude, whether timm's sign is random). The parameter is timm's argument (`LEVEL_TO_ARG`) at the
    level, in the form DALI's op takes."""
    fn, a, core = dali.fn, dali.aug, dali.aug_core
    blur = core.augmentation(lambda data, sigma: fn.gaussian_blur(data, sigma=sigma))
    # Python's uniform(a, b), either order, per sample (DALI's wants a < b); the radius stays > 0 (a = 0.1)
    blur_rand = core.augmentation(lambda data, bounds: fn.gaussian_blur(
        data, sigma=bounds[0] + fn.random.uniform(range=[0.0, 1.0]) * (bounds[1] - bounds[0])))
    # DALI's own equalize and sharpness call deprecated fn.experimental aliases (a warning each build)
    equalize = core.augmentation(lambda data, _: fn.equalize(data))
    sharpness = core.augmentation(lambda data, kernel: fn.filter(data, kernel), param_device="auto")
    factor, kernel = np.float32, (lambda f: a.sharpness_kernel(f - 1.0))  # Pillow's blend with the blurred tile
    # DALI's warps map forward (inverse_map=False), Pillow's matrices (timm's) backward: the same shear or shift is
    # the negated one (rotations turn the same way in both)
    base, to_param = {
        "AutoContrast": (a.auto_contrast, None), "Equalize": (equalize, None), "Invert": (a.invert, None),
        "Rotate": (a.rotate, np.float32),
        "Posterize": (a.posterize, _posterize_mask), "PosterizeIncreasing": (a.posterize, _posterize_mask),
        "PosterizeOriginal": (a.posterize, _posterize_mask),
        "Solarize": (a.solarize, np.float32), "SolarizeIncreasing": (a.solarize, np.float32),
        "SolarizeAdd": (a.solarize_add, np.uint8),
        "Color": (a.color, factor), "ColorIncreasing": (a.color, factor),
        "Contrast": (a.contrast, factor), "ContrastIncreasing": (a.contrast, factor),
        "Brightness": (a.brightness, factor), "BrightnessIncreasing": (a.brightness, factor),
        "Sharpness": (sharpness, kernel), "SharpnessIncreasing": (sharpness, kernel),
        "ShearX": (a.shear_x, lambda f: np.float32([-f, 0])), "ShearY": (a.shear_y, lambda f: np.float32([0, -f])),
        # a share of the tile's side, which DALI's translate multiplies by the `shape` kwarg: the batch's side
        "TranslateXRel": (a.translate_x, lambda pct: np.float32([-pct, 0])),
        "TranslateYRel": (a.translate_y, lambda pct: np.float32([0, -pct])),
        "Desaturate": (a.color, lambda f: np.float32(min(1.0, max(0.0, 1.0 - f)))),  # as augment.py's
        "GaussianBlur": (blur, np.float32),
        "GaussianBlurRand": (blur_rand, np.float32),
    }[name]
    level_to_arg = LEVEL_TO_ARG[name]
    if level_to_arg is None:
        return base.augmentation(name=name), None, False
    signed = level_to_arg(LEVEL_DENOM, _FixedDraws(True), aug) != level_to_arg(LEVEL_DENOM, _FixedDraws(), aug)
    # A negated level gives timm's negated argument: its random sign sits on the level, linearly
    return base.augmentation(name=name), lambda level: to_param(level_to_arg(level, _FixedDraws(), aug)[0]), signed


def _policy_op(dali, name: str, aug: Augment, levels: np.ndarray):
    """timm's op for a DALI Policy: DALI's magnitude bins, each bin's parameter timm's at that level."""
    op, param, signed = _timm_op(dali, name, aug)
    if param is None:
        return op
    # DALI calls mag_to_param while building: plain Python, not through AutoGraph (slow, and it warns)
    return op.augmentation(mag_range=np.float32(levels), randomly_negate=signed,
                           mag_to_param=dali.do_not_convert(param))


def _table_op(dali, name: str, aug: Augment, levels: np.ndarray):
    """timm's op for RandAugment: its parameter per sample out of a table of timm's arguments at `levels` (then at
    -levels where timm's sign is random), by the sample's `level` index and `sign`. DALI's magnitude bins would
    rebuild that table through AutoGraph at every call: seconds per op at this resolution."""
    op, param, signed = _timm_op(dali, name, aug)
    if param is None:
        return op
    table = np.stack([param(v) for v in (np.concatenate([levels, -levels]) if signed else levels)])

    def parameter(data, level, sign):
        device = data.device if op.param_device == "auto" else "cpu"
        return dali.types.Constant(table, device=device)[level + sign * len(levels) if signed else level]

    takes = inspect.signature(op.op).parameters
    if "shape" in takes:  # a translation: a share of each sample's side
        def run(data, _, level, sign, shape, fill_value, interp_type):
            return op.op(data, parameter(data, level, sign), shape, fill_value=fill_value, interp_type=interp_type)
    elif "fill_value" in takes:
        def run(data, _, level, sign, fill_value, interp_type):
            return op.op(data, parameter(data, level, sign), fill_value=fill_value, interp_type=interp_type)
    else:
        def run(data, _, level, sign):
            return op.op(data, parameter(data, level, sign))
    return dali.aug_core.augmentation(run, name=name)


def _warp_kwargs(dali, aug: Augment, sides, ops) -> dict:
    """The extra arguments the warps among `ops` take: fill and interpolation, and for a translation each sample's
    (side, side). Only those some op takes: DALI's apply_auto_augment refuses the rest."""
    offered = dict(fill_value=float(np.mean(aug.fill)), interp_type=dali.types.INTERP_LINEAR, shape=sides)
    taken = {name for op in ops for name in inspect.signature(op.op).parameters}
    return {name: value for name, value in offered.items() if name in taken}


def _layer_choices(dali, aug: Augment) -> list:
    """Each layer's op index per sample, all drawn before any op runs, as timm does."""
    fn, types = dali.fn, dali.types
    count = len(aug.ops)
    if aug.weights is None:  # timm: uniform, with replacement
        return [fn.random.uniform(values=list(range(count)), dtype=types.INT32) for _ in range(aug.num_layers)]
    # Weighted (timm's t sets): without replacement, each next op in proportion to the weights of those left
    left, ids, choices = types.Constant(np.float32(aug.weights)), types.Constant(np.arange(count, dtype=np.int32)), []
    for _ in range(min(aug.num_layers, count)):
        choices.append(fn.random.choice(count, p=left / fn.reductions.sum(left)))
        left = left * (ids != choices[-1])
    return choices


def _level_index(dali, aug: Augment, magnitude: float):
    """One layer's level as an index into the levels: timm's m, or per sample m + N(0, mstd) (uniform in 0..m for
    mstd > 100), clipped to 0..mmax."""
    fn, types, std = dali.fn, dali.types, aug.magnitude_std
    if std == math.inf and magnitude > 0:
        level = fn.random.uniform(range=[0.0, float(magnitude)])
    elif 0 < std < math.inf:
        level = fn.random.normal(mean=float(magnitude), stddev=float(std))
    else:  # no noise (or uniform in 0..0)
        return round(max(0.0, min(magnitude, aug.magnitude_max)) / LEVEL_STEP)
    level = dali.math.clamp(level, 0.0, float(aug.magnitude_max))
    return fn.cast(dali.math.floor(level / LEVEL_STEP + 0.5), dtype=types.INT32)


def _rand_augment(dali, images, aug: Augment, sides):
    fn, types = dali.fn, dali.types
    levels = np.arange(round(aug.magnitude_max / LEVEL_STEP) + 1) * LEVEL_STEP
    ops = [dali.do_not_convert(_table_op)(dali, op.name, aug, levels) for op in aug.ops]  # plain Python
    prob, magnitude = min(1.0, aug.ops[0].prob), aug.ops[0].magnitude  # the same for all of timm's RandAugment ops
    for index in _layer_choices(dali, aug):
        # timm applies a chosen op with probability p, which DALI's apply_rand_augment lacks: a coin per layer and
        # sample routes the sample through the op or past it
        if fn.random.coin_flip(probability=prob, dtype=types.BOOL):
            images = dali.aug_core.select(ops, index, images, level=_level_index(dali, aug, magnitude),
                                          sign=fn.random.coin_flip(dtype=types.INT32),
                                          **_warp_kwargs(dali, aug, sides, ops))
    return images


def _auto_augment(dali, images, aug: Augment, sides):
    levels = np.arange(int(LEVEL_DENOM) + 1)  # a Policy's magnitudes are bins: timm's integer levels 0..10
    names = sorted({op.name for sub in aug.policy for op in sub})
    ops = {name: dali.do_not_convert(_policy_op)(dali, name, aug, levels) for name in names}
    # Ops of probability 0 never run: left out (DALI warns about them)
    sub_policies = [[(ops[op.name], op.prob, None if ops[op.name].mag_range is None else
                      int(min(op.magnitude, aug.magnitude_max))) for op in sub if op.prob > 0] for sub in aug.policy]
    policy = dali.aug_core.Policy(aug.aa, num_magnitude_bins=len(levels), sub_policies=sub_policies)
    return dali.apply_auto_augment(policy, images, **_warp_kwargs(dali, aug, sides, ops.values()))


def _color_jitter(dali, images, jitter: tuple[float, float, float, float]):
    """torchvision's ColorJitter (timm's --color-jitter): factors drawn per sample, the ops in a random order."""
    fn, types, a, core = dali.fn, dali.types, dali.aug, dali.aug_core
    brightness, contrast, saturation, hue = jitter
    ops, factors = [], {}
    for name, v, op in (("brightness", brightness, lambda data, _, brightness: a.brightness.op(data, brightness)),
                        ("contrast", contrast, lambda data, _, contrast: a.contrast.op(data, contrast)),
                        ("saturation", saturation, lambda data, _, saturation: a.color.op(data, saturation))):
        if v:
            ops.append(core.augmentation(op, name=name))
            factors[name] = fn.random.uniform(range=[max(0.0, 1.0 - v), 1.0 + v])
    if hue:
        ops.append(core.augmentation(lambda data, _, hue: fn.hue(data, hue=hue), name="hue"))
        factors["hue"] = fn.random.uniform(range=[-hue, hue]) * 360.0  # a fraction of the circle -> DALI's degrees
    orders = np.array(list(itertools.permutations(range(len(ops)))), np.int32)
    order = types.Constant(orders)[fn.random.uniform(values=list(range(len(orders))), dtype=types.INT32)]
    for position in range(len(ops)):
        images = core.select(ops, order[position], images, **factors)
    return images


def augment(dali, images, aug: Augment, sides):
    """`aug` on the uint8 tiles, each sample's side in `sides`, as `Augment.apply` orders it: --aa, then color
    jitter."""
    if aug.ops:
        images = _rand_augment(dali, images, aug, sides)
    elif aug.policy:
        images = _auto_augment(dali, images, aug, sides)
    elif aug.trivial:  # DALI ships torchvision's TrivialAugmentWide: its suite, 31 bins, torchvision's nearest + fill
        images = dali.trivial_augment_wide(images, num_magnitude_bins=31, fill_value=aug.fill[0],
                                           interp_type=dali.types.INTERP_NN)
    if aug.color_jitter:
        images = _color_jitter(dali, images, aug.color_jitter)
    return images


def graph(dali: SimpleNamespace, source, t: Transform, decoder: dict, normalize: bool, dtype: torch.dtype,
          channels_last: bool, depth: int):
    """The whole DALI graph, as one `@pipeline_def` (DALI's own examples read the same way): the samples `source`
    reads, the crop decoded (train: only the crop's pixels, ROI decode), one resize to the batch's side (+ flip), the
    train augmentation if any (`augment`), and, when DALI `normalize`s, layout and normalization in one pass. Returns
    images, labels and each JPEG's byte count."""
    fn, types = dali.fn, dali.types
    jpegs, labels, sides = fn.external_source(source=source, num_outputs=3, batch=True, batch_info=True,
                                              parallel=True, prefetch_queue_depth=depth,
                                              dtype=[types.UINT8, types.INT64, types.FLOAT])
    # Pixels as stored, no EXIF rotation: what Pillow's Image.open (host backend) and timm's loaders see.
    decoder = dict(adjust_orientation=False, **decoder)
    if t.train:
        images = fn.decoders.image_random_crop(jpegs, output_type=types.RGB, random_area=list(t.scale),
                                               random_aspect_ratio=list(t.ratio), num_attempts=10, **decoder)
        mirror = fn.random.coin_flip(probability=t.hflip)
        # Without DALI normalization the flip rides on the resize (a region whose x runs 1 -> 0 comes out mirrored),
        # so the GPU does decode + one resize per image and nothing else. So it does when augmenting: timm flips
        # before RandAugment, and crop_mirror_normalize would flip after it.
        m = fn.cast(mirror, dtype=types.FLOAT)
        if normalize and not augmenting(t):
            region = {}
        else:
            region, mirror = dict(roi_relative=True, roi_start=fn.stack(m * 0.0, m),
                                  roi_end=fn.stack(m * 0.0 + 1.0, 1.0 - m)), 0
    else:
        # timm's eval transform as one resize of the box that `Transform.crop_box` keeps, computed from the header.
        shape = fn.peek_image_shape(jpegs, adjust_orientation=False)  # (H, W, C)
        height, width = fn.cast(shape[0], dtype=types.FLOAT), fn.cast(shape[1], dtype=types.FLOAT)
        side = dali.math.min(height, width) * (t.img_size / t.eval_resize)
        start = fn.stack((height - side) * 0.5, (width - side) * 0.5)
        images = fn.decoders.image(jpegs, output_type=types.RGB, **decoder)
        mirror, region = 0, dict(roi_start=start, roi_end=start + side)
    interp = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC}[t.interpolation]
    images = fn.resize(images, size=sides, interp_type=interp, antialias=True, **region)
    if augmenting(t):
        images = augment(dali, images, t.augment, sides)
    if normalize:
        images = fn.crop_mirror_normalize(
            images, mirror=mirror, mean=[255 * m for m in t.mean], std=[255 * d for d in t.std],
            dtype=types.FLOAT16 if dtype == torch.float16 else types.FLOAT,
            output_layout="HWC" if channels_last else "CHW")  # HWC viewed as NCHW is channels_last
    return images, labels, jpegs.shape()


class DaliLoader(ShardLoader):
    def __init__(self, spec: LoaderSpec):
        self.dali = import_dali()
        if spec.on_error != "raise":
            raise ValueError("the dali backend supports on_error='raise' only: a DALI decoder that meets a bad JPEG "
                             "fails its whole batch, so it cannot count and skip one sample")
        self.opts = spec.backend_options(DaliOptions)
        super().__init__(spec, "dali")
        self.output = CudaOutput(spec.device, self.dali.feed_ndarray, float(self.opts.hw_decoder_load),
                                 self.opts.preallocate and spec.train, spec.workers) \
            if spec.device.type == "cuda" else HostOutput(spec.device, self.dali.feed_ndarray)
        self.start_method = None  # the readers' (reader_start_method), set when a run starts
        # DALI normalizes only into float/half; uint8 output (model folds normalization in) is always "torch".
        self.dali_normalizes = self.opts.normalize_in == "dali" and spec.dtype != torch.uint8
        self._pipe = None

    def close(self) -> None:
        """Free the pipeline and its reader processes. The loader stays usable: iterating builds anew."""
        self.output.drain()
        # Pipeline.__del__ shuts down DALI's threads and workers and frees its buffers, as the last reference goes.
        self._pipe = None
        self.run.stop()

    def describe(self) -> str:
        s = self.spec
        norm = "dali" if self.dali_normalizes else "torch"
        return (f"dali {self.dali.version} ({self.output.summary}, {s.workers} threads, prefetch {s.prefetch}, "
                f"normalize in {norm}), {s.split} rank {s.rank}/{s.world_size}: {self.steps} batches of "
                f"{s.batch_size}, {len(self.planner.shards)} shards, {self.opts.readers} reader processes "
                f"({self.start_method or self.opts.py_start_method}), augment "
                f"{s.transform.augment.describe()}{s.repeats_note}")

    # -- the run (pipeline/shard_loader.py): one pipeline, whose source runs on across epochs ---------------------
    def start_run(self, position) -> None:
        self.output.drain()
        self._pipe = None  # the old pipeline's memory goes before the new one takes its own
        s, epoch, first = self.spec, position.epoch, self.batches_of(position.epoch, position)[position.local:]
        source = BatchSource(self.planner_for(position), epoch, first, self.whole_batches, self.manifest.num_classes,
                             s.img_size, s.res_schedule if s.train else None)
        self.start_method = reader_start_method(self.opts.py_start_method, self.dali,
                                                on_gpu=self.output.device_id is not None)
        # DALI's conditionals (`if` on data) only where the augmentation routes samples: the plain graph stays as is
        conditionals = dict(enable_conditionals=True) if augmenting(s.transform) else {}
        build = self.dali.pipeline_def(graph, batch_size=s.batch_size, num_threads=s.workers,
                                       device_id=self.output.device_id, seed=pipeline_seed(s.seed, epoch, s.rank),
                                       prefetch_queue_depth=max(1, s.prefetch), py_num_workers=self.opts.readers,
                                       py_start_method=self.start_method,
                                       exec_dynamic=True,  # DALI 2.x default executor: outputs bound to torch's stream
                                       **conditionals)
        self._pipe = build(self.dali, source, s.transform, self.output.decoder, self.dali_normalizes, s.dtype,
                           s.channels_last, max(2, s.prefetch))
        own_temp_folder()
        with main_not_replayed(), stop_signals_blocked():  # readers: not the user's script, not the trainer's signals
            self._pipe.build()

    def take(self, k: int, index: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        stream = self.output.stream()
        try:
            # Outputs come back ordered on torch's current stream: no host sync, the copy below waits on DALI's work.
            images_dali, labels, jpeg_shapes = self._pipe.run(stream)
        except Exception as e:  # noqa: BLE001 - DALI raises bare Exceptions for errors in its source workers
            raise ShardError(f"DALI failed on {self.spec.split} batch {index} of epoch {epoch} (rank {self.spec.rank}"
                             f"), reading {', '.join(self._suspects(k, epoch))}: {dali_reason(e)}") from e
        labels = np.asarray(labels.as_array()).reshape(-1)
        self.bytes_read += int(np.asarray(jpeg_shapes.as_array()).reshape(len(labels), -1)[labels >= 0].sum())
        out = torch.from_numpy(labels)
        # Pinned, so the small copy is queued behind the device's work instead of waiting for it.
        out = out.pin_memory().to(self.spec.device, non_blocking=True) if self.spec.device.type != "cpu" else out
        return self._to_torch(images_dali, stream), out

    def _suspects(self, k: int, epoch: int) -> list[str]:
        """The shards the failing batch can have come from. DALI reports errors per batch, and runs its queues a few
        batches ahead, so the batches up to that depth are named."""
        ahead = self.batches_of(epoch)[k:k + self.spec.prefetch + 2]
        names = {Path(ref[0].path).name for i in ahead for ref in self.planner.batch(epoch, i) if ref}
        return sorted(names) or ["(padding only)"]

    def _to_torch(self, images_dali, stream) -> torch.Tensor:
        s, tensor = self.spec, images_dali.as_tensor()
        hwc = not self.dali_normalizes or s.channels_last
        shape = tuple(tensor.shape())  # at the epoch's side (a schedule's), in DALI's layout
        dtype = (torch.float16 if s.dtype == torch.float16 else torch.float32) if self.dali_normalizes else torch.uint8
        out = self.output.take(tensor, shape, dtype, stream)
        if not self.dali_normalizes:
            return to_model_input(out, s, nhwc=True)
        out = out.permute(0, 3, 1, 2) if hwc else out
        return out if out.dtype == s.dtype else out.to(s.dtype)  # bfloat16: DALI writes float32, torch casts
