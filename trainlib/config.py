"""The one typed config of a training run: `TrainConfig` holds every knob with its default and a one-line help; the
command line is generated from it (`build_parser`), and the resolved values are written to `<output>/config.json`.

The seed's Ascend ModelZoo flags keep their names and meaning (`--data_path --amp --addr --seed --workers/-j
--learning-rate/--lr --momentum --weight-decay/--wd --print-freq/-p --device --dist-backend --epochs --batch-size/-b
--gpu --rank --dist-url --multiprocessing-distributed --world-size`); docs/training.md says how the launch flags map
onto torchrun.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
from dataclasses import dataclass

from pipeline.backends import BACKENDS, WITH_OPTIONS, get_backend
from pipeline.augment import AugmentError, parse as parse_augment
from pipeline.cli import (CommandParser, add_flags, flag_names, from_args, knob, markdown_rows,
                          parse_with_config_file, plain)
from pipeline.config import DataConfig
from pipeline.loader import IMAGENET_CLASSES
from pipeline.resolution import ResSchedule, ScheduleError

AMP_MODES = ("auto", "bf16", "fp16", "fp32")


class ConfigError(ValueError):
    """A flag value that cannot work; the message names the flag."""


@dataclass
class TrainConfig(DataConfig):
    """The data and loader knobs are pipeline/config.py's `DataConfig` (the benchmark's too); the rest follow."""

    config: str = knob(None, "YAML file of defaults (timm's train.py -c): its keys are the flags' names with "
                             "underscores (batch_size: 128, model_ema: true); flags on the command line win",
                       "-c", metavar="FILE")
    # data, beyond DataConfig's
    eval_img_size: int = knob(0, "eval side; 0 = the last epoch's train side (--img-size without a schedule)")
    eval_crop_pct: float = knob(0.0, "eval: resize to side / crop_pct, then the central crop; 0 = the model's")
    reprob: float = knob(0.0, "random erasing: the probability per train sample (timm's RandomErasing, on the device)")
    remode: str = knob("pixel", "random erasing fill: per-pixel normal noise, a normal colour per box, or the mean "
                                "(0 after normalization)", choices=("pixel", "rand", "const"))
    recount: int = knob(1, "random erasing: up to this many boxes per erased sample (the count drawn in 1..N)")
    aug_repeats: int = knob(0, "repeated augmentation (DeiT): each epoch takes 1/N of the samples, N copies each, "
                               "the copies on different ranks (pipeline/plan.py rule 7); 0 or 1 = off")
    num_classes: int = knob(0, "classifier width; 0 = the shards' class count (synthetic without data: "
                               f"{IMAGENET_CLASSES})")
    on_error: str = knob("raise", "a corrupt sample: raise (names shard+key) or skip (count, replace)",
                         choices=("raise", "skip"))
    check_shards: str = knob("contents", "before training: contents (each shard's sha256 and index, read once per "
                                         "copy of the files and remembered in a cache folder) or sizes (the "
                                         "listing every start does)", choices=("contents", "sizes"))
    batch_size: int = knob(256, "per-rank batch (under --multiprocessing-distributed: per node, as in the seed)", "-b")
    val_batch_size: int = knob(0, "per-rank eval batch; 0 = --batch-size")
    # model
    model: str = knob("vit_base_patch32_224", "timm model name (built with pretrained=False: never downloads)")
    pretrained: str = knob(None, "local checkpoint to start from (timm/torch state dict or our .pth); a head of "
                                 "another class count is re-initialised", metavar="PATH")
    drop_path: float = knob(0.0, "stochastic depth rate")
    channels_last: bool = knob(False, "NHWC input images (the patch-embedding conv may run faster)")
    compile: bool = knob(False, "torch.compile the model (first steps are slow: excluded from FPS)")
    pixel_input: bool = knob(True, "feed uint8 pixels and fold mean/std into the patch embedding (model/fused.py): "
                                   "the same function and gradients, 1 byte per pixel to the device, no normalize")
    fp8: bool = knob(False, "FP8 matmuls in the blocks' linears (model/fp8.py): lossy, off by default; whether it "
                            "pays for ViT-B/32: docs/benchmarks.md; CUDA 8.9+ or CPU")
    # optimisation
    opt: str = knob("adamw", "optimizer; sgd is the seed's SGD with momentum", choices=("adamw", "sgd"))
    lr: float = knob(1e-3, "peak learning rate (not scaled by batch size)", "--learning-rate")
    momentum: float = knob(0.9, "SGD momentum")
    weight_decay: float = knob(0.05, "decoupled (adamw) / L2 (sgd) weight decay; none on norms, biases, tokens",
                               "--wd")
    fused_opt: bool = knob(True, "fused optimizer kernels on CUDA (elsewhere, and when off: foreach)")
    epochs: int = knob(8, "training epochs")
    warmup_epochs: float = knob(1.0, "linear LR warm-up length in epochs")
    warmup_steps: int = knob(0, "linear LR warm-up length in steps; > 0 overrides --warmup-epochs")
    min_lr: float = knob(1e-6, "LR at the end of the cosine decay")
    label_smoothing: float = knob(0.1, "label smoothing (folded into the mixed targets under --mixup/--cutmix)",
                                  "--smoothing")
    mixup: float = knob(0.0, "mixup alpha; mixup is on when > 0 (batch augmentation on the device, timm's Mixup)")
    cutmix: float = knob(0.0, "cutmix alpha; cutmix is on when > 0")
    cutmix_minmax: list[float] = knob(None, "cutmix box sides as fractions of the image, drawn in [LO, HI); turns "
                                            "cutmix on with alpha 1 and overrides --cutmix", metavar=("LO", "HI"),
                                      nargs=2)
    mixup_prob: float = knob(1.0, "probability of mixing a batch (or a sample or pair, see --mixup-mode)")
    mixup_switch_prob: float = knob(0.5, "probability of cutmix instead of mixup when both are on")
    mixup_mode: str = knob("batch", "one draw for the batch, per pair of samples, or per sample",
                           choices=("batch", "pair", "elem"))
    mixup_off_epoch: int = knob(0, "turn mixup/cutmix off from this epoch on; 0 = never")
    bce_loss: bool = knob(False, "binary cross-entropy on the (mixed, smoothed) targets instead of softmax "
                                 "cross-entropy (timm's BinaryCrossEntropy)")
    bce_sum: bool = knob(False, "--bce-loss: sum over classes (mean over the batch)")
    bce_target_thresh: float = knob(None, "--bce-loss: binarize the targets at this threshold")
    model_ema: bool = knob(False, "keep an exponential moving average of the weights (timm's ModelEmaV3: one fused "
                                  "foreach lerp per step), evaluated beside them; best.pth by its Acc@1")
    model_ema_decay: float = knob(0.9998, "EMA decay per optimizer step")
    model_ema_warmup: bool = knob(False, "ramp the EMA decay up from 0 (timm's warm-up: 1 - (1 + step)^-2/3, "
                                         "capped at --model-ema-decay)")
    layer_decay: float = knob(None, "layer-wise LR decay (BEiT/MAE fine-tuning): layer i of L gets LR x "
                                    "DECAY^(L-i), timm's ViT groups")
    grad_accum_steps: int = knob(1, "micro-batches per optimizer step (DDP syncs on the last); the global batch is "
                                    "--batch-size x ranks x N, the LR schedule counts optimizer steps")
    clip_grad: float = knob(1.0, "clip the global gradient norm to this; 0 = off")
    amp: str = knob("auto", "precision: auto (bf16 where supported, else fp16; fp32 on CPU), bf16, fp16, fp32; "
                            "bare --amp = auto (the seed's switch), --no-amp = fp32", choices=AMP_MODES, const="auto")
    seed: int = knob(0, "seed: model init uses it as is, each rank's RNG seed + rank")
    # run length
    max_steps: int = knob(0, "stop after this many global steps (checkpoint, no eval); 0 = no limit")
    steps_per_epoch: int = knob(0, "cap each epoch at this many steps (perf runs); 0 = the loader's length")
    evaluate: bool = knob(False, "evaluate --pretrained/--resume weights on val and exit")
    eval_freq: int = knob(1, "evaluate every N epochs (and after the last); 0 = never")
    # output
    output: str = knob("output/train", "run folder: config.json, env.json, metrics.jsonl, checkpoints, plots")
    resume: str = knob(None, "checkpoint to continue from, or 'auto' = <output>/last.pth if present",
                       metavar="PATH|auto")
    resume_other_data: bool = knob(False, "let --resume take a checkpoint trained on another shard set (other "
                                          "classes or train shards; refused without it): its weights, EMA and "
                                          "optimizer state start epoch 0 of this set with a new LR schedule; for "
                                          "weights alone, --pretrained")
    save_checkpoints: bool = knob(True, "write last.pth (every epoch) and best.pth (best Acc@1)")
    save_steps: int = knob(0, "also write last.pth every N global steps; 0 = only at epoch ends")
    print_freq: int = knob(10, "log every N steps", "-p")
    warmup_log_steps: int = knob(10, "steps left out of the mean img/s (compile, allocator and pipeline warm-up)")
    plots: bool = knob(True, "write plots.png (loss, img/s, input wait) at the end")
    tensorboard: bool = knob(False, "also write the figures of metrics.jsonl as TensorBoard scalars to <output>/tb "
                                    "(rank 0; needs the tensorboard package: pip install -e '.[tensorboard]')")
    # devices and launch (under torchrun its environment places the process: --addr/--dist-url are ignored, a
    # --rank/--world-size that disagrees is an error)
    device: str = knob("auto", "auto, gpu (= cuda), cuda, npu or cpu", choices=("auto", "gpu", "cuda", "npu", "cpu"))
    gpu: int = knob(None, "device index for a single-process run (torchrun: LOCAL_RANK)")
    dist_backend: str = knob(None, "process-group backend; default nccl (cuda), hccl (npu), gloo (cpu)")
    dist_url: str = knob("env://", "rendezvous outside torchrun: env:// or tcp://HOST:PORT (sets MASTER_ADDR/PORT)")
    dist_timeout: float = knob(600.0, "seconds joining the group or any collective may wait for the other ranks; "
                                      "then the run fails, so a lost rank is an error torchrun can restart on")
    addr: str = knob(None, "MASTER_ADDR outside torchrun (the seed's --addr)")
    world_size: int = knob(1, "outside torchrun: processes in the job; with --multiprocessing-distributed: nodes")
    rank: int = knob(0, "outside torchrun: this process's rank; with --multiprocessing-distributed: node rank")
    multiprocessing_distributed: bool = knob(False, "the seed's launcher: spawn one process per device on this node "
                                                    "(torchrun is preferred)")
    nproc_per_node: int = knob(0, "processes --multiprocessing-distributed spawns; 0 = every visible device")

    def validate(self) -> None:
        import timm  # here, not at the top: the flag parser (`train.py -h`) stays light

        if not timm.is_model(self.model):
            raise ConfigError(f"--model {self.model}: not a timm model name (e.g. vit_base_patch32_224)")
        self.resolve_workers()
        positive = ("workers", "img_size", "batch_size", "epochs", "print_freq", "recount", "grad_accum_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{flag_name(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("num_classes", "val_batch_size", "max_steps", "steps_per_epoch", "eval_freq", "save_steps",
                     "warmup_steps", "warmup_log_steps", "nproc_per_node", "lr", "weight_decay", "clip_grad",
                     "warmup_epochs", "drop_path", "min_lr", "dist_timeout", "mixup", "cutmix", "aug_repeats",
                     "mixup_off_epoch", "min_res", "max_res", "start_ramp", "end_ramp", "eval_img_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{flag_name(name)} must be >= 0, got {getattr(self, name)}")
        try:
            parse_augment(self.aa, self.color_jitter, (0.5, 0.5, 0.5))
        except AugmentError as e:
            raise ConfigError(str(e)) from None
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        self.validate_recipe()
        for name in WITH_OPTIONS:  # each backend's own rule for its options (DALI itself is not imported)
            try:
                getattr(self, name).validate()
            except ValueError as e:
                raise ConfigError(f"{name} option {e} (--{name}-* flags)") from None
        chosen = get_backend(self.backend)
        self.res_schedule(1)  # the flags among themselves; the patch grid is checked with the model
        if not 0 <= self.eval_crop_pct <= 1:
            raise ConfigError(f"--eval-crop-pct must be in (0, 1] (0: the model's), got {self.eval_crop_pct}")
        if chosen.reads_shards and not self.data_path:
            raise ConfigError(f"--backend {self.backend} reads shards: give --data_path (or use a backend that reads "
                              f"none: {', '.join(n for n in BACKENDS if not get_backend(n).reads_shards)})")
        if self.on_error == "skip" and not chosen.skips_bad_samples:
            raise ConfigError(f"--on-error skip: --backend {self.backend} cannot skip one bad sample (DALI fails a "
                              f"whole batch on a bad JPEG); use --backend "
                              f"{', '.join(n for n in BACKENDS if get_backend(n).skips_bad_samples)}")
        if self.evaluate and not (self.pretrained or self.resume):
            raise ConfigError("--evaluate needs weights: give --pretrained PATH or --resume PATH")
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("--tensorboard needs the tensorboard package: pip install -e '.[tensorboard]' "
                              "(or pip install tensorboard)")

    def res_schedule(self, step: int) -> ResSchedule | None:
        """The train side per epoch (pipeline/resolution.py), in multiples of `step` (the patch size); None: a
        fixed --img-size. ConfigError for one that cannot work. A run's is in its RunShape (trainlib/shape.py)."""
        try:
            return super().res_schedule(step)
        except ScheduleError as e:
            raise ConfigError(str(e)) from None

    def validate_recipe(self) -> None:
        """The batch augmentation, EMA and optimizer-recipe flags (timm's names and ranges)."""
        for name in ("reprob", "mixup_prob", "mixup_switch_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{flag_name(name)} is a probability in [0, 1], got {getattr(self, name)}")
        if self.cutmix_minmax is not None:
            lo, hi = self.cutmix_minmax
            if not 0 <= lo < hi <= 1:
                raise ConfigError(f"--cutmix-minmax {lo} {hi}: give 0 <= LO < HI <= 1 (fractions of the image side)")
        if self.mixing and self.batch_size % 2:
            raise ConfigError(f"--mixup/--cutmix pair each sample with the batch's mirror image: --batch-size must be "
                              f"even, got {self.batch_size}")
        if not 0 <= self.model_ema_decay < 1:
            raise ConfigError(f"--model-ema-decay must be in [0, 1), got {self.model_ema_decay}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ConfigError(f"--layer-decay must be in (0, 1], got {self.layer_decay}")
        if self.bce_target_thresh is not None and not 0 < self.bce_target_thresh < 1:
            raise ConfigError(f"--bce-target-thresh must be in (0, 1), got {self.bce_target_thresh}")

    @property
    def mixing(self) -> bool:
        """Mixup or cutmix is on (timm's `mixup_active`)."""
        return self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None

    def to_dict(self) -> dict:
        """Plain values only (config.json, checkpoints: `torch.load(weights_only=True)` reads them), each once."""
        return plain(self)


def flag_name(field_name: str) -> str:
    """`--img-size` for img_size: the flag a message should name."""
    return flag_names(next(f for f in dataclasses.fields(TrainConfig) if f.name == field_name))[0]


def build_parser() -> argparse.ArgumentParser:
    """The command line, generated field by field from TrainConfig (pipeline/cli.py)."""
    parser = CommandParser(prog="train.py", description="Train a timm ViT on webdataset shards "
                           "(single process, torchrun, or the seed's --multiprocessing-distributed).",
                           allow_abbrev=False)  # an abbreviation could silently bind to a new flag later
    add_flags(parser, TrainConfig)
    parser.add_argument("--no-amp", dest="amp", action="store_const", const="fp32", help="full fp32 (= --amp fp32)")
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Flags (and a -c/--config YAML file of defaults, timm's form) -> a validated TrainConfig. Unknown flags, bad
    values and an unusable file exit with a short usage line and the error (status 2)."""
    parser = build_parser()
    cfg = from_args(TrainConfig, vars(parse_with_config_file(parser, argv)))
    try:
        cfg.validate()
    except ConfigError as e:
        parser.error(str(e))
    return cfg


def markdown_table() -> str:
    """The flags table of docs/training.md, generated from TrainConfig so the two cannot drift."""
    return "\n".join(["| flag | default | meaning |", "|---|---|---|", *markdown_rows(TrainConfig)])


if __name__ == "__main__":
    print(markdown_table())
