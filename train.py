"""Train (or evaluate) a timm ViT on webdataset shards: ViT-B/32 on ImageNet by default.

    python train.py --data_path SHARDS --device cpu ...                      # one process
    torchrun --nproc_per_node=8 train.py --data_path SHARDS ...             # DDP, one process per device
    python train.py --data_path SHARDS --multiprocessing-distributed ...    # the seed's launcher (torchrun preferred)

Flags: `python train.py -h` or docs/training.md (generated from config.TrainConfig). The run folder (--output) gets
config.json, env.json, metrics.jsonl, last.pth / best.pth, summary.json and plots.png.
"""
from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

import checkpoint
import pipeline
from config import ConfigError, TrainConfig, parse_config
from devices import DeviceError, resolve_device
from model import (CheckpointMismatch, build_model, flops_per_image, fp8_supported, model_defaults, use_fp8,
                   use_pixel_input)
from pipeline.dali import DaliMissingError
from pipeline.shards import PipelineError, read_manifest
from trainlib import distributed
from trainlib.engine import Trainer, build_optimizer, build_scheduler
from trainlib.runlog import QuietLog, RunLog, environment, plot_metrics

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SYNTHETIC_CLASSES = 1000  # synthetic input without shards stands in for ImageNet


def amp_dtype(cfg: TrainConfig, device) -> torch.dtype:
    """--amp auto: bf16 where the accelerator has it, else fp16 (with loss scaling); fp32 on the CPU."""
    if cfg.amp != "auto":
        return AMP_DTYPES[cfg.amp]
    if device.kind == "cpu":
        return torch.float32
    return torch.bfloat16 if device.supports_bf16() else torch.float16


def num_classes(cfg: TrainConfig) -> int:
    if cfg.num_classes:
        return cfg.num_classes
    if not cfg.data_path:
        return SYNTHETIC_CLASSES
    manifest = read_manifest(cfg.data_path)
    if "num_classes" in manifest:
        return int(manifest["num_classes"])
    return len(json.loads((Path(cfg.data_path) / "classes.json").read_text()))


def seed_everything(seed: int, device) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    device.manual_seed(seed)


def build_loaders(cfg: TrainConfig, device, where, dtype: torch.dtype, classes: int):
    defaults = model_defaults(cfg.model)
    # Images arrive as uint8 when the model folds normalization in (--pixel-input), else in the autocast dtype: the
    # first layer would cast them anyway, and half the bytes move.
    dtype = torch.uint8 if cfg.pixel_input else dtype
    common = dict(data_path=cfg.data_path, backend=cfg.backend, device=device.device, rank=where.rank,
                  world_size=where.world_size, workers=cfg.workers, seed=cfg.seed, img_size=cfg.img_size,
                  mean=defaults["mean"], std=defaults["std"], crop_pct=defaults["crop_pct"], dtype=dtype,
                  on_error=cfg.on_error, channels_last=cfg.channels_last, num_classes=classes)
    extra = {"prebuild": cfg.dali_prebuild, "hw_decoder_load": cfg.dali_hw_decoder_load} if cfg.backend == "dali" \
        else {}
    train = None if cfg.evaluate else pipeline.build_loader(split="train", batch_size=cfg.batch_size, extra=extra,
                                                            **common)
    val = None
    if cfg.evaluate or cfg.eval_freq:
        val = pipeline.build_loader(split="val", batch_size=cfg.val_batch_size or cfg.batch_size, **common)
    return train, val


def build_trainer(cfg: TrainConfig, device, where, log, steps_per_epoch: int, classes: int) -> Trainer:
    seed_everything(cfg.seed, device)  # the same initial weights on every rank, whatever the world size
    net = build_model(cfg.model, num_classes=classes, img_size=cfg.img_size, pretrained=cfg.pretrained,
                      drop_path=cfg.drop_path).to(device.device)
    patch = getattr(getattr(net, "patch_embed", None), "patch_size", None)
    if patch and (cfg.img_size % patch[0] or cfg.img_size % patch[1]):
        raise ConfigError(f"--img-size {cfg.img_size} is not a multiple of {cfg.model}'s patch size {patch[0]}")
    if cfg.pixel_input:
        defaults = model_defaults(cfg.model)
        net = use_pixel_input(net, defaults["mean"], defaults["std"])
    if cfg.fp8:
        why_not = fp8_supported(device.device)
        if why_not:
            raise ConfigError(f"--fp8: {why_not}")
        if not use_fp8(net):
            raise ConfigError(f"--fp8: {cfg.model} has no linear layer in blocks.* that FP8 matmuls accept")
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    model = net
    if where.world_size > 1:
        ids = [device.index] if device.index is not None else None
        model = torch.nn.parallel.DistributedDataParallel(net, device_ids=ids, find_unused_parameters=False)
    if cfg.compile:
        model = torch.compile(model)
    optimizer = build_optimizer(cfg, net, device)
    try:
        flops = flops_per_image(net, cfg.img_size)
    except TypeError:
        flops = None  # not a ViT: MFU is left out
    dtype = amp_dtype(cfg, device)
    return Trainer(cfg, net=net, model=model, optimizer=optimizer,
                   scheduler=build_scheduler(cfg, optimizer, steps_per_epoch), device=device, amp_dtype=dtype,
                   log=log, placement=where, steps_per_epoch=steps_per_epoch, num_classes=classes,
                   flops_per_image=flops)


def fit(cfg: TrainConfig, trainer: Trainer, train_loader, val_loader, log) -> None:
    """Epochs from the trainer's position to --epochs (or --max-steps), evaluating and checkpointing at epoch ends."""
    while trainer.epoch < cfg.epochs:
        train_loader.set_epoch(trainer.epoch)
        trainer.train_epoch(train_loader)
        if trainer.step_in_epoch < trainer.steps_per_epoch:  # stopped by --max-steps inside the epoch
            trainer.save_checkpoint()
            return
        best = False
        last_epoch = trainer.epoch + 1 == cfg.epochs
        if val_loader is not None and ((trainer.epoch + 1) % cfg.eval_freq == 0 or last_epoch):
            val_loader.set_epoch(trainer.epoch)
            acc1, _, _ = trainer.evaluate(val_loader)
            best = trainer.best_acc1 is None or acc1 > trainer.best_acc1
            trainer.best_acc1 = max(acc1, trainer.best_acc1 or acc1)
        trainer.epoch, trainer.step_in_epoch = trainer.epoch + 1, 0
        trainer.save_checkpoint(best=best)
        if trainer.reached_max_steps():
            return


def run(cfg: TrainConfig) -> None:
    """One process's whole run: device, process group, loaders, model, resume, epochs, summary."""
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    where = distributed.placement(cfg)
    resume_path = checkpoint.resolve_resume(cfg.resume, cfg.output)
    if cfg.evaluate and resume_path is None and not cfg.pretrained:
        raise ConfigError(f"--evaluate --resume {cfg.resume}: no checkpoint in {cfg.output}")
    distributed.setup(cfg, device, where)
    # Only rank 0 writes checkpoints: with --resume auto every rank must see the same file, or ranks would start
    # from different steps and hang in the first collective that one of them skips.
    seen = distributed.all_gather(None if resume_path is None else str(resume_path))
    if len(set(seen)) > 1:
        raise ConfigError(f"--resume {cfg.resume}: ranks found different checkpoints {sorted(set(map(str, seen)))}; "
                          f"put --output on storage that every node sees, or pass --resume PATH")
    log = RunLog(cfg.output, append=resume_path is not None) if where.is_main else QuietLog()
    loaders = ()
    try:
        log.write_json("config.json", vars(cfg))
        classes = num_classes(cfg)
        dtype = amp_dtype(cfg, device)
        loaders = build_loaders(cfg, device, where, dtype, classes)
        train_loader, val_loader = loaders
        log.write_json("env.json", {**environment(device, where.world_size), **{
            f"{name}_loader": loader.describe() for name, loader in (("train", train_loader), ("val", val_loader))
            if hasattr(loader, "describe")}})
        spe = len(train_loader) if train_loader is not None else 1
        spe = min(spe, cfg.steps_per_epoch) if cfg.steps_per_epoch else spe
        trainer = build_trainer(cfg, device, where, log, spe, classes)
        if resume_path is not None:
            trainer.load_state_dict(checkpoint.load(resume_path))
            log.print(f"resumed {resume_path}: epoch {trainer.epoch} step {trainer.step_in_epoch} "
                      f"(global {trainer.global_step})")
        else:
            seed_everything(cfg.seed + where.rank, device)  # per-rank streams (drop path, ...) from here on
        log.print(f"{cfg.model} {classes} classes, {where.world_size} x {device.name()}, {cfg.backend} input, "
                  f"{str(dtype).removeprefix('torch.')}, {spe} steps/epoch x {cfg.batch_size} x {where.world_size}")
        if cfg.evaluate:
            trainer.evaluate(val_loader)
            return
        if trainer.epoch >= cfg.epochs or trainer.reached_max_steps():
            # A finished run resumed (say by a launch script's --resume auto): keep its summary.json and figures.
            log.print(f"nothing to train: the checkpoint is at epoch {trainer.epoch}, step {trainer.global_step}")
            return
        fit(cfg, trainer, train_loader, val_loader, log)
        summarize(cfg, trainer, log, time.perf_counter() - t_start)
    finally:
        for loader in loaders:
            if loader is not None:
                loader.close()
        log.close()
        distributed.teardown()


def summarize(cfg: TrainConfig, trainer: Trainer, log, wall_s: float) -> None:
    fps = trainer.meter.mean_img_s()
    summary = {"fps": fps, "input_wait": trainer.meter.mean_input_wait(), "best_acc1": trainer.best_acc1,
               "global_step": trainer.global_step, "epochs_done": trainer.epoch, "wall_s": wall_s}
    log.record("summary", **summary)
    log.write_json("summary.json", summary)
    if fps is None:
        log.print(f"FPS@all n/a (no steps after the {cfg.warmup_log_steps} warm-up steps)")
    else:
        log.print(f"FPS@all {fps:.3f}")
    best = "n/a" if trainer.best_acc1 is None else f"{trainer.best_acc1:.3f}"
    log.print(f"summary: {trainer.global_step} steps, best Acc@1 {best}, wall {wall_s:.1f} s, "
              f"output {cfg.output}")
    if cfg.plots and isinstance(log, RunLog):
        plot_metrics(Path(cfg.output))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)
    try:
        if cfg.multiprocessing_distributed and "RANK" not in os.environ:
            distributed.spawn(cfg, resolve_device(cfg.device), run)
        else:
            run(cfg)
    except (ConfigError, DeviceError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except (PipelineError, CheckpointMismatch, checkpoint.CheckpointError, DaliMissingError, FileNotFoundError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Loaders and the process group were closed on the way out; the last checkpoint is intact (atomic writes).
        print(f"train.py: interrupted; rerun with --resume auto --output {cfg.output} to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
