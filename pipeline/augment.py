"""Per-sample augmentation of the train tile, after the crop and flip, where timm applies it: `--aa` (timm's
RandAugment and AutoAugment, its spellings and semantics) and `--color-jitter` (torchvision's ColorJitter, as timm
passes it). One parse of the flags (`parse`) gives an `Augment`; `Augment.apply(tile, rng)` draws the ops of one
sample from the batch's seeded `random.Random` and runs them on the (S, S, 3) uint8 tile in place.

  --aa rand-m9-mstd0.5-inc1   RandAugment: n ops (n2) drawn from timm's 15 (inc1: its increasing-magnitude set;
                              t<weights|3a|3aw>: another of its sets), each applied with probability p (p0.5) at
                              magnitude m out of 10, jittered by a normal of std mstd (over 100: uniform in 0..m),
                              clipped to mmax (10);
  --aa original | originalr | v0 | v0r | 3a [-mstdS]   AutoAugment: one of the policy's sub-policies per sample;
  --aa ta_wide                TrivialAugment as torchvision's TrivialAugmentWide (timm has none; torchvision's
                              reference recipes spell it so): one op of 14 at one of 31 magnitudes, nearest
                              resampling, black fill;
  --color-jitter 0.4 | B,C,S[,H]   brightness/contrast/saturation factors drawn in [1 - x, 1 + x], hue in [-h, h],
                              applied in a random order; as in timm, off when --aa is given (except its 3a policies).

The magnitudes, op choices, argument ranges and draws are timm's (the fill is the model's mean in 0..255), so a
timm recipe's spec transfers; two differences from timm's train.py: it resamples each geometric op bilinear or
bicubic at random (--train-interpolation random), here bilinear as the crop, and its --color-jitter defaults to
0.4, here to off (the seed's recipe). The ops run on the tile in pipeline/_augment.c (one pass each, what Pillow
computes: tests/test_augment.py checks each against timm's op) except hue and Gaussian blur, which go through
Pillow; without that extension they all do, as timm's, slower. The DALI backend builds the same policy from the
same `Augment` (pipeline/dali.py).
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

try:
    from pipeline import _augment
except ImportError:  # not built (no C compiler at install): the same ops through Pillow
    _augment = None
KERNELS_BUILT = _augment is not None

LEVEL_DENOM = 10.0  # timm's magnitude scale: m out of 10
MAX_LEVEL = 100  # m and mmax beyond it would shear and rotate past any meaning (and past the kernels' fixed point)

# timm's op sets for RandAugment (timm.data.auto_augment), by the names its level functions use
RAND_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
            "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
RAND_INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                       "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                       "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
RAND_SETS = {
    "3a": ("SolarizeIncreasing", "Desaturate", "GaussianBlur"),
    "weights": {"Rotate": 3, "ShearX": 2, "ShearY": 2, "TranslateXRel": 1, "TranslateYRel": 1,
                "ColorIncreasing": .25, "SharpnessIncreasing": 0.25, "AutoContrast": 0.25, "SolarizeIncreasing": .05,
                "SolarizeAdd": .05, "ContrastIncreasing": .05, "BrightnessIncreasing": .05, "Equalize": .05,
                "PosterizeIncreasing": 0.05, "Invert": 0.05},
    "3aw": {"SolarizeIncreasing": 6, "Desaturate": 6, "GaussianBlur": 6, "Rotate": 3, "ShearX": 2, "ShearY": 2,
            "PosterizeIncreasing": 1, "AutoContrast": 1, "ColorIncreasing": 1, "SharpnessIncreasing": 1,
            "ContrastIncreasing": 1, "BrightnessIncreasing": 1, "Equalize": 1, "Invert": 1},
}

# timm's AutoAugment policies: sub-policies of (op, probability, magnitude)
_V0 = (
    (("Equalize", 0.8, 1), ("ShearY", 0.8, 4)), (("Color", 0.4, 9), ("Equalize", 0.6, 3)),
    (("Color", 0.4, 1), ("Rotate", 0.6, 8)), (("Solarize", 0.8, 3), ("Equalize", 0.4, 7)),
    (("Solarize", 0.4, 2), ("Solarize", 0.6, 2)), (("Color", 0.2, 0), ("Equalize", 0.8, 8)),
    (("Equalize", 0.4, 8), ("SolarizeAdd", 0.8, 3)), (("ShearX", 0.2, 9), ("Rotate", 0.6, 8)),
    (("Color", 0.6, 1), ("Equalize", 1.0, 2)), (("Invert", 0.4, 9), ("Rotate", 0.6, 0)),
    (("Equalize", 1.0, 9), ("ShearY", 0.6, 3)), (("Color", 0.4, 7), ("Equalize", 0.6, 0)),
    (("Posterize", 0.4, 6), ("AutoContrast", 0.4, 7)), (("Solarize", 0.6, 8), ("Color", 0.6, 9)),
    (("Solarize", 0.2, 4), ("Rotate", 0.8, 9)), (("Rotate", 1.0, 7), ("TranslateYRel", 0.8, 9)),
    (("ShearX", 0.0, 0), ("Solarize", 0.8, 4)), (("ShearY", 0.8, 0), ("Color", 0.6, 4)),
    (("Color", 1.0, 0), ("Rotate", 0.6, 2)), (("Equalize", 0.8, 4), ("Equalize", 0.0, 8)),
    (("Equalize", 1.0, 4), ("AutoContrast", 0.6, 2)), (("ShearY", 0.4, 7), ("SolarizeAdd", 0.6, 7)),
    (("Posterize", 0.8, 2), ("Solarize", 0.6, 10)), (("Solarize", 0.6, 8), ("Equalize", 0.6, 1)),
    (("Color", 0.8, 6), ("Rotate", 0.4, 5)),
)
_ORIGINAL = (
    (("PosterizeOriginal", 0.4, 8), ("Rotate", 0.6, 9)), (("Solarize", 0.6, 5), ("AutoContrast", 0.6, 5)),
    (("Equalize", 0.8, 8), ("Equalize", 0.6, 3)), (("PosterizeOriginal", 0.6, 7), ("PosterizeOriginal", 0.6, 6)),
    (("Equalize", 0.4, 7), ("Solarize", 0.2, 4)), (("Equalize", 0.4, 4), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, 7)), (("PosterizeOriginal", 0.8, 5), ("Equalize", 1.0, 2)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)), (("Equalize", 0.6, 8), ("PosterizeOriginal", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)), (("Rotate", 0.4, 9), ("Equalize", 0.6, 2)),
    (("Equalize", 0.0, 7), ("Equalize", 0.8, 8)), (("Invert", 0.6, 4), ("Equalize", 1.0, 8)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)), (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)), (("Sharpness", 0.4, 7), ("Invert", 0.6, 8)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, 9)), (("Color", 0.4, 0), ("Equalize", 0.6, 3)),
    (("Equalize", 0.4, 7), ("Solarize", 0.2, 4)), (("Solarize", 0.6, 5), ("AutoContrast", 0.6, 5)),
    (("Invert", 0.6, 4), ("Equalize", 1.0, 8)), (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, 8), ("Equalize", 0.6, 3)),
)


def _research_posterize(policy):
    """The 'r' variants: Posterize whose discarded bits grow with the magnitude (timm's PosterizeIncreasing)."""
    research = {"Posterize": "PosterizeIncreasing", "PosterizeOriginal": "PosterizeIncreasing"}
    return tuple(tuple((research.get(name, name), p, m) for name, p, m in sub) for sub in policy)


AUTO_POLICIES = {
    "original": _ORIGINAL, "originalr": _research_posterize(_ORIGINAL), "v0": _V0, "v0r": _research_posterize(_V0),
    "3a": ((("Solarize", 1.0, 5),), (("Desaturate", 1.0, 10),), (("GaussianBlurRand", 1.0, 10),)),
}

AA_FLAG_HELP = ("per-sample train augmentation, timm's spec (pipeline/augment.py): rand-m9-mstd0.5-inc1 "
                "(RandAugment), original, originalr, v0, v0r, 3a (AutoAugment), ta_wide (TrivialAugment); none by "
                "default")
COLOR_JITTER_FLAG_HELP = ("timm's color jitter: brightness, contrast and saturation factors in [1-X, 1+X], or "
                          "X,X,X[,HUE]; off under --aa except its 3a policies, as in timm; none by default")
AA_HELP = ("rand-m<M>[-n<N>][-p<P>][-mstd<S>][-mmax<X>][-inc<0|1>][-t<weights|3a|3aw>] (RandAugment), "
           "original, originalr, v0, v0r, 3a [-mstd<S>] (AutoAugment), or ta_wide (TrivialAugment)")

# torchvision's TrivialAugmentWide: op -> (its 31 magnitudes, or None for none; whether the sign is random), in
# torchvision's order. The geometric ones carry their own names: torchvision's geometry is not timm's.
TRIVIAL_BINS = 31
TRIVIAL_OPS = {
    "Identity": (None, False),
    "TrivialShearX": (np.linspace(0.0, 0.99, TRIVIAL_BINS, dtype=np.float32), True),
    "TrivialShearY": (np.linspace(0.0, 0.99, TRIVIAL_BINS, dtype=np.float32), True),
    "TrivialTranslateX": (np.linspace(0.0, 32.0, TRIVIAL_BINS, dtype=np.float32), True),
    "TrivialTranslateY": (np.linspace(0.0, 32.0, TRIVIAL_BINS, dtype=np.float32), True),
    "TrivialRotate": (np.linspace(0.0, 135.0, TRIVIAL_BINS, dtype=np.float32), True),
    "TrivialBrightness": (np.linspace(0.0, 0.99, TRIVIAL_BINS, dtype=np.float32), True),
    "TrivialColor": (np.linspace(0.0, 0.99, TRIVIAL_BINS, dtype=np.float32), True),
    "TrivialContrast": (np.linspace(0.0, 0.99, TRIVIAL_BINS, dtype=np.float32), True),
    "TrivialSharpness": (np.linspace(0.0, 0.99, TRIVIAL_BINS, dtype=np.float32), True),
    "TrivialPosterize": (8 - np.round(np.arange(TRIVIAL_BINS) / ((TRIVIAL_BINS - 1) / 6)), False),
    "TrivialSolarize": (np.linspace(255.0, 0.0, TRIVIAL_BINS, dtype=np.float32), False),
    "AutoContrast": (None, False),
    "Equalize": (None, False),
}
TRIVIAL_NAMES = tuple(TRIVIAL_OPS)


# -- magnitude -> arguments, timm's level functions (with the sample's rng for the random sign) ---------------------
def _signed(v: float, rng: random.Random) -> float:
    return -v if rng.random() > 0.5 else v


def _enhance(level, rng, aug):
    return ((level / LEVEL_DENOM) * 1.8 + 0.1,)


def _enhance_increasing(level, rng, aug):
    return (max(0.1, 1.0 + _signed((level / LEVEL_DENOM) * .9, rng)),)


def _minmax(lo: float, hi: float):
    def level_to_arg(level, rng, aug):
        return (max(lo, min(hi, lo + (hi - lo) * (level / LEVEL_DENOM))),)
    return level_to_arg


def _posterize(level, rng, aug):
    return (int((level / LEVEL_DENOM) * 4),)


def _solarize(level, rng, aug):
    return (min(256, int((level / LEVEL_DENOM) * 256)),)


def _blur_rand(level, rng, aug):
    # timm draws the radius inside the op; drawn here, in the same place of the sequence
    return (rng.uniform(0.1, 2.0 * _minmax(0.0, 1.0)(level, rng, aug)[0]),)


LEVEL_TO_ARG: dict[str, Callable | None] = {
    "AutoContrast": None, "Equalize": None, "Invert": None,
    "Rotate": lambda level, rng, aug: (_signed((level / LEVEL_DENOM) * 30.0, rng),),
    "Posterize": _posterize,
    "PosterizeIncreasing": lambda level, rng, aug: (4 - _posterize(level, rng, aug)[0],),
    "PosterizeOriginal": lambda level, rng, aug: (_posterize(level, rng, aug)[0] + 4,),
    "Solarize": _solarize,
    "SolarizeIncreasing": lambda level, rng, aug: (256 - _solarize(level, rng, aug)[0],),
    "SolarizeAdd": lambda level, rng, aug: (min(128, int((level / LEVEL_DENOM) * 110)),),
    "Color": _enhance, "ColorIncreasing": _enhance_increasing,
    "Contrast": _enhance, "ContrastIncreasing": _enhance_increasing,
    "Brightness": _enhance, "BrightnessIncreasing": _enhance_increasing,
    "Sharpness": _enhance, "SharpnessIncreasing": _enhance_increasing,
    "ShearX": lambda level, rng, aug: (_signed((level / LEVEL_DENOM) * 0.3, rng),),
    "ShearY": lambda level, rng, aug: (_signed((level / LEVEL_DENOM) * 0.3, rng),),
    "TranslateXRel": lambda level, rng, aug: (_signed((level / LEVEL_DENOM) * 0.45, rng),),
    "TranslateYRel": lambda level, rng, aug: (_signed((level / LEVEL_DENOM) * 0.45, rng),),
    "Desaturate": _minmax(0.5, 1.0),
    "GaussianBlur": _minmax(0.1, 2.0),
    "GaussianBlurRand": _blur_rand,
}


@dataclass(frozen=True)
class Op:
    """One op of a policy (timm's AugmentOp): applied with probability `prob` at `magnitude` (out of 10)."""

    name: str
    prob: float
    magnitude: float


@dataclass(frozen=True)
class Augment:
    """A parsed `--aa` and `--color-jitter` for one tile size and fill: what `apply` does to each train sample."""

    aa: str | None = None  # the --aa spec as given
    ops: tuple[Op, ...] = ()  # RandAugment: the set the layers choose from
    weights: tuple[float, ...] | None = None  # RandAugment: choice weights (then without replacement), or uniform
    num_layers: int = 2  # RandAugment: ops per sample
    policy: tuple[tuple[Op, ...], ...] = ()  # AutoAugment: its sub-policies, one per sample
    trivial: bool = False  # TrivialAugmentWide: one of TRIVIAL_OPS per sample
    magnitude_std: float = 0.0  # > 0: each magnitude ~ N(m, std); inf: ~ U(0, m)
    magnitude_max: float = LEVEL_DENOM
    color_jitter: tuple[float, float, float, float] | None = None  # brightness, contrast, saturation, hue
    fill: tuple[int, int, int] = (128, 128, 128)  # what the geometric ops expose (timm: the mean, in 0..255)

    @property
    def active(self) -> bool:
        return bool(self.ops or self.policy or self.trivial or self.color_jitter)

    def describe(self) -> str:
        parts = [f"--aa {self.aa}"] if self.aa else []
        if self.color_jitter:
            parts.append("color jitter " + ",".join(f"{v:g}" for v in self.color_jitter))
        return ", ".join(parts) or "none"

    def draw(self, rng: random.Random) -> list[tuple[str, tuple]]:
        """The ops one sample goes through, in order, with their arguments: the random part of `apply`."""
        steps: list[tuple[str, tuple]] = []
        if self.ops:
            for op in self._choose_layers(rng):
                self._draw_op(op, rng, steps)
        elif self.policy:
            for op in self.policy[rng.randrange(len(self.policy))]:
                self._draw_op(op, rng, steps)
        elif self.trivial:
            steps.append(_draw_trivial(rng))
        if self.color_jitter:
            steps.extend(_draw_jitter(self.color_jitter, rng))
        return steps

    def apply(self, tile: np.ndarray, rng: random.Random) -> None:
        """Augment one (S, S, 3) uint8 tile in place, drawing from `rng` (the batch's: reruns repeat it)."""
        run(tile, self.draw(rng), self.fill)

    def _choose_layers(self, rng: random.Random) -> list[Op]:
        if self.weights is None:  # timm: numpy's choice with replacement
            return [self.ops[rng.randrange(len(self.ops))] for _ in range(self.num_layers)]
        # Weighted: without replacement, each next op in proportion to the weights of those not yet chosen (the
        # distribution numpy's choice(replace=False, p=...) draws from)
        left, weights, chosen = list(self.ops), list(self.weights), []
        for _ in range(min(self.num_layers, len(left))):
            i = rng.choices(range(len(left)), weights)[0]
            chosen.append(left.pop(i))
            weights.pop(i)
        return chosen

    def _draw_op(self, op: Op, rng: random.Random, steps: list) -> None:
        # timm's AugmentOp.__call__, draw for draw
        if op.prob < 1.0 and rng.random() > op.prob:
            return
        magnitude = op.magnitude
        if self.magnitude_std == math.inf:
            magnitude = rng.uniform(0, magnitude)
        elif self.magnitude_std > 0:
            magnitude = rng.gauss(magnitude, self.magnitude_std)
        magnitude = max(0.0, min(magnitude, self.magnitude_max))
        level_to_arg = LEVEL_TO_ARG[op.name]
        steps.append((op.name, level_to_arg(magnitude, rng, self) if level_to_arg else ()))


def _draw_trivial(rng: random.Random) -> tuple[str, tuple]:
    """torchvision's TrivialAugmentWide.forward: an op, one of its magnitudes, then (signed ops) the sign."""
    name = TRIVIAL_NAMES[rng.randrange(len(TRIVIAL_NAMES))]
    magnitudes, signed = TRIVIAL_OPS[name]
    magnitude = 0.0 if magnitudes is None else float(magnitudes[rng.randrange(TRIVIAL_BINS)])
    if signed and rng.randrange(2):
        magnitude = -magnitude
    return (name, () if magnitudes is None else (magnitude,))


def _draw_jitter(jitter, rng: random.Random) -> list[tuple[str, tuple]]:
    """torchvision's ColorJitter: the four factors drawn first, then applied in a random order."""
    brightness, contrast, saturation, hue = jitter
    order = list(range(4))
    rng.shuffle(order)
    factors = [rng.uniform(max(0.0, 1 - v), 1 + v) if v else None for v in (brightness, contrast, saturation)]
    factors.append(rng.uniform(-hue, hue) if hue else None)
    names = ("Brightness", "Contrast", "Color", "Hue")
    return [(names[i], (factors[i],)) for i in order if factors[i] is not None]


class AugmentError(ValueError):
    """A bad --aa or --color-jitter: its one-line message names the flag and what is allowed."""


def parse(aa: str | None, color_jitter: str | float | tuple | None, mean: tuple[float, float, float]) -> Augment:
    """`--aa` and `--color-jitter` as timm reads them, for a model `mean` (the fill). Nothing in it depends on the
    tile's side: timm's translations are a share of it, taken at each tile's own side (TrivialAugment's are pixels,
    as torchvision's)."""
    jitter = parse_color_jitter(color_jitter)
    fill = tuple(min(255, round(255 * m)) for m in mean)
    common = dict(fill=fill)
    if not aa:
        return Augment(color_jitter=jitter, **common)
    if jitter and "3a" not in aa:
        jitter = None  # timm turns color jitter off under --aa, except with its 3a policies
    name, *sections = aa.split("-")
    if name == "rand":
        return Augment(aa=aa, color_jitter=jitter, **common, **_rand_settings(aa, sections))
    if name in AUTO_POLICIES:
        settings = {}
        for key, value in (_section(aa, s) for s in sections):
            if key != "mstd":
                raise AugmentError(f"--aa {aa}: unknown section {key}{value} (AutoAugment takes only -mstd<S>)")
            settings["magnitude_std"] = _number(aa, key, value)
        policy = tuple(tuple(Op(*op) for op in sub) for sub in AUTO_POLICIES[name])
        return Augment(aa=aa, policy=policy, color_jitter=jitter, **common, **settings)
    if name == "ta_wide":
        if sections:
            raise AugmentError(f"--aa {aa}: ta_wide takes no sections (TrivialAugment has no magnitude to set)")
        return Augment(aa=aa, trivial=True, color_jitter=jitter, **{**common, "fill": (0, 0, 0)})
    if name == "augmix":
        raise AugmentError(f"--aa {aa}: AugMix is not supported (it mixes several augmented copies); use {AA_HELP}")
    raise AugmentError(f"--aa {aa}: unknown policy {name!r}; use {AA_HELP}")


def _section(aa: str, section: str) -> tuple[str, str]:
    match = re.fullmatch(r"([a-z]+)(.*)", section)
    if not match or not match.group(2):
        raise AugmentError(f"--aa {aa}: cannot read section {section!r}; use {AA_HELP}")
    return match.group(1), match.group(2)


def _number(aa: str, key: str, value: str, kind=float):
    try:
        number = kind(value)
    except ValueError:
        raise AugmentError(f"--aa {aa}: {key} wants a{'n integer' if kind is int else ' number'}, got {value!r}") \
            from None
    if number < 0:
        raise AugmentError(f"--aa {aa}: {key} must be >= 0, got {value}")
    return number


def _rand_settings(aa: str, sections: list[str]) -> dict:
    magnitude, num_layers, prob, increasing, choice, std, mmax = LEVEL_DENOM, 2, 0.5, False, None, 0.0, LEVEL_DENOM
    for section in sections:
        if section.startswith("t"):
            choice = section[1:]
            if choice not in RAND_SETS:
                raise AugmentError(f"--aa {aa}: unknown op set t{choice}; timm's are {', '.join(RAND_SETS)}")
            continue
        key, value = _section(aa, section)
        if key == "m":
            magnitude = _number(aa, key, value, int)
        elif key == "n":
            num_layers = _number(aa, key, value, int)
        elif key == "p":
            prob = _number(aa, key, value)
        elif key == "mstd":
            std = _number(aa, key, value)
            std = math.inf if std > 100 else std  # timm: mstd above 100 means uniform
        elif key == "mmax":
            mmax = _number(aa, key, value, int) or LEVEL_DENOM  # timm: mmax0 is the default
        elif key == "inc":
            increasing = bool(_number(aa, key, value, int))
        else:
            raise AugmentError(f"--aa {aa}: unknown section {key}{value}; use {AA_HELP}")
    if max(magnitude, mmax) > MAX_LEVEL:
        raise AugmentError(f"--aa {aa}: magnitudes above {MAX_LEVEL} (m, mmax) mean nothing: timm's scale is 0..10")
    names = RAND_SETS.get(choice) or (RAND_INCREASING_OPS if increasing else RAND_OPS)
    weights = None
    if isinstance(names, dict):
        total = sum(names.values())
        names, weights = tuple(names), tuple(w / total for w in names.values())
    return dict(ops=tuple(Op(n, prob, magnitude) for n in names), weights=weights, num_layers=num_layers,
                magnitude_std=std, magnitude_max=mmax)


def parse_color_jitter(value) -> tuple[float, float, float, float] | None:
    """timm's --color-jitter: one number for brightness, contrast and saturation, or 3 (or 4, with hue) of them."""
    if value in (None, "", 0, 0.0):
        return None
    if isinstance(value, str):
        parts = value.replace(",", " ").split()
    else:
        parts = list(value) if isinstance(value, (tuple, list)) else [value]
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        raise AugmentError(f"--color-jitter {value}: want a number or 3-4 comma-separated numbers "
                           f"(brightness, contrast, saturation[, hue])") from None
    if len(numbers) == 1:
        numbers *= 3
    if len(numbers) not in (3, 4) or any(n < 0 for n in numbers) or (len(numbers) == 4 and numbers[3] > 0.5):
        raise AugmentError(f"--color-jitter {value}: want 1, 3 or 4 numbers >= 0 (brightness, contrast, "
                           f"saturation[, hue <= 0.5])")
    numbers += [0.0] * (4 - len(numbers))
    return None if not any(numbers) else tuple(numbers)


# -- the ops on a tile ------------------------------------------------------------------------------------------------
def run(tile: np.ndarray, steps: list[tuple[str, tuple]], fill: tuple[int, int, int]) -> None:
    """Apply drawn `steps` to `tile` in place: the kernels of pipeline/_augment.c, or Pillow without them."""
    if not steps:
        return
    if _augment is None:
        image = Image.fromarray(tile)
        for name, args in steps:
            image = PILLOW_OPS[name](image, *args, fill=fill)
        tile[...] = np.asarray(image)
        return
    for name, args in steps:
        KERNEL_OPS[name](tile, *args, fill=fill)


_IDENTITY = np.arange(256, dtype=np.uint8)


def _affine(tile, matrix, fill, bilinear=True) -> None:
    out = np.empty_like(tile)
    _augment.affine(tile, out, tuple(float(v) for v in matrix), fill, bilinear)
    tile[...] = out


def rotate_matrix(degrees: float, width: int, height: int) -> tuple[float, ...]:
    """Image.rotate's inverse matrix: the rotation by `degrees` counter-clockwise about the tile's centre."""
    angle = -math.radians(degrees)
    a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
    c, d = round(-math.sin(angle), 15), round(math.cos(angle), 15)
    cx, cy = width / 2, height / 2
    return (a, b, a * -cx + b * -cy + cx, c, d, c * -cx + d * -cy + cy)


def _rotate(tile, degrees, fill, bilinear=True) -> None:
    angle = degrees % 360.0
    h, w = tile.shape[:2]
    if angle == 0:
        return
    if angle == 180 or (angle in (90, 270) and w == h):  # Image.rotate transposes these
        tile[...] = np.rot90(tile, {90: 1, 180: 2, 270: 3}[int(angle)]).copy()
        return
    _affine(tile, rotate_matrix(angle, w, h), fill, bilinear)  # from the reduced angle, as Image.rotate


def trivial_shear(m: float) -> float:
    """torchvision's shear for TrivialAugment: an angle of atan(m) degrees, whose matrix holds tan of it again."""
    return math.tan(math.radians(math.degrees(math.atan(m))))


def _sharpen(tile, factor, fill=None) -> None:
    out = np.empty_like(tile)
    _augment.sharpen(tile, out, factor)
    tile[...] = out


def _hue(tile, shift, fill=None) -> None:
    # torchvision's adjust_hue on a PIL image: the H channel of HSV moved by shift * 255, wrapping around
    h, s, v = Image.fromarray(tile).convert("HSV").split()
    moved = (np.asarray(h).astype(np.int16) + np.uint8(int(shift * 255) % 256)).astype(np.uint8)
    tile[...] = np.asarray(Image.merge("HSV", (Image.fromarray(moved, "L"), s, v)).convert("RGB"))


def _blur(tile, radius, fill=None) -> None:
    tile[...] = np.asarray(Image.fromarray(tile).filter(ImageFilter.GaussianBlur(radius=radius)))


def _solarize_add_table(add: int, threshold: int = 128) -> np.ndarray:
    return np.where(_IDENTITY < threshold, np.minimum(255, _IDENTITY.astype(np.int16) + add), _IDENTITY)


def _desaturate_factor(factor: float) -> float:
    return min(1.0, max(0.0, 1.0 - factor))


def _point(tile, kind: str, a: int = 0, b: int = 0, factor: float = 0.0) -> None:
    _augment.point(tile, getattr(_augment, kind), a, b, factor)


def _posterize_tile(tile, bits: int) -> None:
    if bits < 8:  # keep the `bits` high bits (0: black)
        _point(tile, "POSTERIZE", ~(2 ** (8 - bits) - 1) & 0xFF)


# The warps of both paths: the inverse matrix and whether bilinear, from the op's argument and the tile's size.
# timm's ops resample bilinear; TrivialAugment's as torchvision runs them on a PIL image: nearest, its shears about
# the corner, its translations whole pixels.
WARPS: dict[str, Callable] = {
    "ShearX": lambda f, w, h: ((1, f, 0, 0, 1, 0), True),
    "ShearY": lambda f, w, h: ((1, 0, 0, f, 1, 0), True),
    "TranslateXRel": lambda pct, w, h: ((1, 0, pct * w, 0, 1, 0), True),
    "TranslateYRel": lambda pct, w, h: ((1, 0, 0, 0, 1, pct * h), True),
    "TrivialShearX": lambda m, w, h: ((1, trivial_shear(m), 0, 0, 1, 0), False),
    "TrivialShearY": lambda m, w, h: ((1, 0, 0, trivial_shear(m), 1, 0), False),
    "TrivialTranslateX": lambda m, w, h: ((1, 0, -int(m), 0, 1, 0), False),
    "TrivialTranslateY": lambda m, w, h: ((1, 0, 0, 0, 1, -int(m)), False),
}


def _with_aliases(ops: dict[str, Callable]) -> dict[str, Callable]:
    """The names that are another op under other level functions (timm's Increasing and Original variants,
    TrivialAugment's enhancements by 1 + m and its posterize), from the base ops of one path."""
    for name in ("Posterize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness"):
        ops[name + "Increasing"] = ops[name]
    ops["PosterizeOriginal"] = ops["Posterize"]
    for name in ("Brightness", "Color", "Contrast", "Sharpness"):
        ops["Trivial" + name] = (lambda op: lambda x, m, fill: op(x, 1.0 + m, fill=fill))(ops[name])
    ops["TrivialPosterize"] = lambda x, m, fill: ops["Posterize"](x, int(m), fill)
    ops["Identity"] = lambda x, fill: x
    return ops


def _kernel_warp(warp: Callable) -> Callable:
    def op(tile, arg, fill):
        matrix, bilinear = warp(arg, tile.shape[1], tile.shape[0])
        _affine(tile, matrix, fill, bilinear)
    return op


KERNEL_OPS: dict[str, Callable] = _with_aliases({
    "AutoContrast": lambda t, fill: _augment.autocontrast(t),
    "Equalize": lambda t, fill: _augment.equalize(t),
    "Invert": lambda t, fill: _point(t, "INVERT"),
    "Rotate": lambda t, degrees, fill: _rotate(t, degrees, fill),
    "Posterize": lambda t, bits, fill: _posterize_tile(t, bits),
    "Solarize": lambda t, threshold, fill: _point(t, "SOLARIZE", threshold),
    "SolarizeAdd": lambda t, add, fill: _point(t, "SOLARIZE_ADD", 128, add),
    "Color": lambda t, factor, fill: _augment.blend_gray(t, factor),
    "Contrast": lambda t, factor, fill: _point(t, "BLEND", int(_augment.gray_mean(t) + 0.5), 0, factor),
    "Brightness": lambda t, factor, fill: _point(t, "BLEND", 0, 0, factor),
    "Sharpness": _sharpen,
    "Desaturate": lambda t, factor, fill: _augment.blend_gray(t, _desaturate_factor(factor)),
    "GaussianBlur": _blur,
    "GaussianBlurRand": _blur,
    "Hue": _hue,
    "TrivialRotate": lambda t, m, fill: _rotate(t, m, fill, False),
    "TrivialSolarize": lambda t, m, fill: _point(t, "SOLARIZE", math.ceil(m)),  # v < m, for integers v
    **{name: _kernel_warp(warp) for name, warp in WARPS.items()},
})


def _pillow_warp(warp: Callable) -> Callable:
    def op(image, arg, fill):
        matrix, bilinear = warp(arg, *image.size)
        return image.transform(image.size, Image.AFFINE, matrix, resample=Image.BILINEAR if bilinear else
                               Image.NEAREST, fillcolor=fill)
    return op


def _pillow_hue(image, shift, fill=None):
    tile = np.array(image)
    _hue(tile, shift)
    return Image.fromarray(tile)


# The same ops through Pillow, timm's calls: the path without pipeline/_augment.c
PILLOW_OPS: dict[str, Callable] = _with_aliases({
    "AutoContrast": lambda im, fill: ImageOps.autocontrast(im),
    "Equalize": lambda im, fill: ImageOps.equalize(im),
    "Invert": lambda im, fill: ImageOps.invert(im),
    "Rotate": lambda im, degrees, fill: im.rotate(degrees, resample=Image.BILINEAR, fillcolor=fill),
    # Pillow 13's ImageOps.posterize refuses 0 bits, which Pillow 12 (and timm's level functions) map to black
    "Posterize": lambda im, bits, fill: im if bits >= 8 else im.point([v & (~(2 ** (8 - bits) - 1) & 0xFF)
                                                                       for v in range(256)] * 3),
    "Solarize": lambda im, threshold, fill: ImageOps.solarize(im, threshold),
    "SolarizeAdd": lambda im, add, fill: im.point(list(_solarize_add_table(add)) * 3),
    "Color": lambda im, factor, fill: ImageEnhance.Color(im).enhance(factor),
    "Contrast": lambda im, factor, fill: ImageEnhance.Contrast(im).enhance(factor),
    "Brightness": lambda im, factor, fill: ImageEnhance.Brightness(im).enhance(factor),
    "Sharpness": lambda im, factor, fill: ImageEnhance.Sharpness(im).enhance(factor),
    "Desaturate": lambda im, factor, fill: ImageEnhance.Color(im).enhance(_desaturate_factor(factor)),
    "GaussianBlur": lambda im, radius, fill: im.filter(ImageFilter.GaussianBlur(radius=radius)),
    "GaussianBlurRand": lambda im, radius, fill: im.filter(ImageFilter.GaussianBlur(radius=radius)),
    "Hue": _pillow_hue,
    "TrivialRotate": lambda im, m, fill: im.rotate(m, resample=Image.NEAREST, fillcolor=fill),
    "TrivialSolarize": lambda im, m, fill: ImageOps.solarize(im, m),
    **{name: _pillow_warp(warp) for name, warp in WARPS.items()},
})
