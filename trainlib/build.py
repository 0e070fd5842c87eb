"""The builders that turn a `TrainConfig` into a run's parts: loaders, model, and the optimisation step in a `Trainer`.
train.py and the benchmarks (tools/bench_train.py) call the same ones, so a benchmark measures train.py's step."""
from __future__ import annotations

import inspect
import random
from pathlib import Path

import numpy as np
import torch
from timm.utils import ModelEmaV3
from torch.nn.modules.batchnorm import _NormBase

from model import build_model, flops_per_image, fp8_supported, model_defaults, use_fp8, use_pixel_input
from pipeline.backends import build_loader, get_backend
from pipeline.config import loader_args
from pipeline.loader import IMAGENET_CLASSES
from pipeline.shards import contents, storage
from pipeline.shards.contents import Checked
from pipeline.shards.errors import ShardError
from pipeline.shards.format import CLASSES, ShardSet
from trainlib.batch_augment import BatchAugment
from trainlib.config import ConfigError, TrainConfig
from trainlib import distributed
from trainlib.distributed import Placement
from trainlib.engine import Trainer
from trainlib.optim import OptimStep, build_loss, build_optimizer, build_scheduler
from trainlib.shape import RunShape, run_shape


def class_count(cfg: TrainConfig, shards: ShardSet | None) -> int:
    """--num-classes, else the shards' class count; synthetic input without shards stands in for ImageNet."""
    if cfg.num_classes:
        return cfg.num_classes
    return shards.manifest.num_classes if shards is not None else IMAGENET_CLASSES


def seed_everything(seed: int, device) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    device.manual_seed(seed)


def data_identity(cfg: TrainConfig, shards: ShardSet | None) -> dict | None:
    """What tells the shard set this run reads from another (None without shards), recorded in its checkpoints for a
    resume to compare (trainlib.resume.check_data): the manifest's plan id, the train shards' fingerprint (a digest
    of the manifest's sha256s: nothing is read but it and classes.json), the class list and the train sample count."""
    if shards is None or not get_backend(cfg.backend).reads_shards:
        return None
    split = shards.manifest.splits.get("train")  # a val-only set serves --evaluate
    if shards.classes is None:  # a set made before classes.json: nothing a resume could compare classes with
        raise ShardError(f"{storage.join(shards.path, CLASSES)}: no class list here; remake the set with "
                         f"tools/make_shards.py")
    return {"plan_id": shards.manifest.plan_id, "classes": shards.classes, "train_shards": shards.fingerprint("train"),
            "train_samples": split.num_samples if split is not None else None}


def check_contents(cfg: TrainConfig, placement: Placement, shards: ShardSet | None) -> Checked | None:
    """--check-shards contents: the shards this run reads, checked against the manifest's sha256 and their indexes
    (pipeline/shards/contents.py), the unverified ones split among the ranks of each machine (each machine checks its
    own copy of the files), the results gathered. A ShardError naming the first shard that differs, unless --on-error
    skip, where the loaders skip those shards' samples and count them. None when there is nothing to check."""
    if cfg.check_shards != "contents" or not cfg.data_path or not get_backend(cfg.backend).reads_shards:
        return None
    splits = [split for split, read in (("train", not cfg.evaluate), ("val", cfg.evaluate or cfg.eval_freq)) if read]
    mates = distributed.node_mates(placement)
    mine = contents.check(cfg.data_path, shards.manifest, splits,
                          (mates.index(placement.rank), len(mates)), progress=placement.is_main)
    found = Checked()
    for rank, theirs in enumerate(distributed.all_gather(mine)):
        if rank in mates:
            found.merge(theirs)
    if found.problems and cfg.on_error == "raise":
        name = min(found.problems)
        more = f" (and {len(found.problems) - 1} more shards)" if len(found.problems) > 1 else ""
        error = ShardError(f"{storage.join(cfg.data_path, name)}: {found.problems[name]}{more}")
        error.quiet = not placement.is_main  # every rank raises it, from the same gathered results: one line
        raise error
    return found


def run_args(cfg: TrainConfig, device, placement: Placement, classes: int, checked: Checked | None = None,
             shards: ShardSet | None = None) -> dict:
    """The loaders' arguments beyond DataConfig's (pipeline/config.py `loader_args`): the run's device, rank, model
    and error policy."""
    defaults = model_defaults(cfg.model)
    # Images arrive as uint8 when the model folds normalization in (--pixel-input), else in the autocast dtype: the
    # first layer would cast them anyway, and half the bytes move.
    dtype = torch.uint8 if cfg.pixel_input else device.amp_dtype(cfg.amp)
    return dict(device=device.device, rank=placement.rank, world_size=placement.world_size, seed=cfg.seed,
                mean=defaults["mean"], std=defaults["std"], crop_pct=defaults["crop_pct"], dtype=dtype,
                on_error=cfg.on_error, channels_last=cfg.channels_last, num_classes=classes,
                aug_repeats=max(1, cfg.aug_repeats),  # val ignores it
                shard_problems=checked.problems if checked else None, shards=shards)


def build_loaders(cfg: TrainConfig, device, placement: Placement, classes: int, shape: RunShape,
                  checked: Checked | None = None, shards: ShardSet | None = None):
    """(train loader or None under --evaluate, val loader or None without evaluation) for this rank; `shape`: the
    run's sides; `checked`: what check_contents found; `shards`: the set, opened."""
    common = run_args(cfg, device, placement, classes, checked, shards)
    train = None
    if not cfg.evaluate:
        train = build_loader(**loader_args(cfg, "train", shape.schedule), batch_size=cfg.batch_size, **common)
    val = None
    if cfg.evaluate or cfg.eval_freq:
        crop = dict(crop_pct=cfg.eval_crop_pct) if cfg.eval_crop_pct else {}
        val = build_loader(**{**loader_args(cfg, "val"), "img_size": shape.eval_side},
                           batch_size=cfg.val_batch_size or cfg.batch_size, **{**common, **crop})
    return train, val


def check_model(cfg: TrainConfig, classes: int) -> RunShape:
    """The model's mistakes before anything is written (on the meta device, so nothing is allocated): the sides
    against its patch, and a --pretrained file that is not there. Returns the run's shape."""
    if cfg.pretrained and not Path(cfg.pretrained).is_file():
        raise FileNotFoundError(f"--pretrained {cfg.pretrained}: no such checkpoint file")
    with torch.device("meta"):
        model = build_model(cfg.model, num_classes=classes, img_size=cfg.img_size, drop_path=cfg.drop_path)
    return run_shape(cfg, model)


def build_model_for(cfg: TrainConfig, device, classes: int, shape: RunShape) -> torch.nn.Module:
    """The bare model on the device, with --pixel-input, --fp8 and --channels-last applied."""
    extra = {"dynamic_img_size": True} if shape.dynamic else {}
    model = build_model(cfg.model, num_classes=classes, img_size=cfg.img_size, pretrained=cfg.pretrained,
                        drop_path=cfg.drop_path, **extra).to(device.device)
    if cfg.pixel_input:
        defaults = model_defaults(cfg.model)
        model = use_pixel_input(model, defaults["mean"], defaults["std"])
    if cfg.fp8:
        why_not = fp8_supported(device.device)
        if why_not:
            raise ConfigError(f"--fp8: {why_not}")
        if not use_fp8(model):
            raise ConfigError(f"--fp8: {cfg.model} has no linear layer in blocks.* that FP8 matmuls accept")
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def compiled(model: torch.nn.Module, shape: RunShape, backend=None) -> torch.nn.Module:
    """torch.compile with `backend` (the device's, Device.compile_backend; None: torch.compile's default): under
    several image sides (a schedule, another eval side) one static graph per side and mode (`dynamic=False`), rather
    than dynamo's switch to a dynamic-shape graph at the second side, whose kernels are generic; its recompile limit
    raised to hold them all."""
    named = {} if backend is None else {"backend": backend}
    if not shape.dynamic:
        return torch.compile(model, **named)
    graphs = 2 * len(shape.sides) + 2  # train and eval mode each, and slack
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the name in newer torch, and the older one
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), graphs))
    return torch.compile(model, dynamic=False, **named)


def compiled_graphs() -> int:
    """Graphs torch.compile made in this process so far (dynamo's count)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def changing_buffers(model: torch.nn.Module) -> bool:
    """Whether training changes any of the model's buffers: running statistics (BatchNorm and the other norms of
    torch's `_NormBase` that track them). The ViT's only buffers are --pixel-input's mean/std (model/fused.py),
    constants set at construction and so the same on every rank."""
    return any(isinstance(m, _NormBase) and m.track_running_stats for m in model.modules())


def data_parallel(model: torch.nn.Module, device) -> torch.nn.parallel.DistributedDataParallel:
    """DDP over the process group. Rank 0's buffers are broadcast before every forward only where training changes
    them: constant buffers would be one broadcast per step for nothing."""
    ids = [device.index] if device.index is not None else None
    # torch 2.13 renamed the switch (forward_sync_buffers, which still syncs buffers once at construction) and
    # deprecated broadcast_buffers; older torch (the GPU image's 2.11) has only the old name.
    ddp = torch.nn.parallel.DistributedDataParallel
    name = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters else \
        "broadcast_buffers"
    return ddp(model, device_ids=ids, find_unused_parameters=False, **{name: changing_buffers(model)})


def build_trainer(cfg: TrainConfig, device, placement: Placement, log, steps_per_epoch: int,
                  classes: int, data: dict | None = None, shape: RunShape | None = None) -> Trainer:
    """`data`: the shard set's `data_identity`, which the trainer's checkpoints record (train.py reads it once, for
    the resume's check too); None records none (the step benchmarks write no checkpoint). `shape`: the run's sides
    (check_model's; found here when not given)."""
    shape = shape or run_shape(cfg)
    seed_everything(cfg.seed, device)  # the same initial weights on every rank, whatever the world size
    raw_model = build_model_for(cfg, device, classes, shape)
    # Before DDP and compile wrap it: the average is of the bare module's weights, the same on every rank.
    ema = ModelEmaV3(raw_model, decay=cfg.model_ema_decay, use_warmup=cfg.model_ema_warmup) if cfg.model_ema else None
    model = ddp = raw_model if placement.world_size == 1 else data_parallel(raw_model, device)
    if cfg.compile:
        model = compiled(model, shape, device.compile_backend())
    optimizer = build_optimizer(cfg, raw_model, device)
    defaults = model_defaults(cfg.model)
    augment = BatchAugment.from_config(cfg, num_classes=classes, mean=defaults["mean"], std=defaults["std"],
                                       pixels=cfg.pixel_input, seed=cfg.seed + placement.rank)
    optim = OptimStep(model=model, raw_model=raw_model, optimizer=optimizer,
                      scheduler=build_scheduler(cfg, optimizer, steps_per_epoch), device=device,
                      amp_dtype=device.amp_dtype(cfg.amp), clip_grad=cfg.clip_grad, loss_fn=build_loss(cfg),
                      batch_augment=augment, no_sync=ddp.no_sync if ddp is not raw_model else None)
    try:
        flops = {side: flops_per_image(raw_model, side) for side in set(shape.train_sides)}
    except TypeError:
        flops = None  # not a ViT: MFU is left out
    return Trainer(cfg, raw_model=raw_model, model=model, optim=optim, device=device, log=log, placement=placement,
                   steps_per_epoch=steps_per_epoch, num_classes=classes, flops_per_image=flops, data=data, ema=ema,
                   shape=shape)
