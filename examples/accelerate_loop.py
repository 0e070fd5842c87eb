"""The loader in a Hugging Face Accelerate training loop, resumable mid-epoch: `accelerator.register_for_checkpointing`
puts the loader's position into every `accelerator.save_state`, and `accelerator.load_state` restores it with the
model, the optimizer and the random states.

    python examples/accelerate_loop.py --data_path SHARDS --out runs/accelerate --epochs 2
    accelerate launch examples/accelerate_loop.py --data_path SHARDS --out runs/accelerate --epochs 2 --resume

The loader is not a `torch.utils.data.DataLoader`, so `accelerator.prepare` has nothing to do for it (it would hand it
back unchanged): it reads each rank's share itself, from the rank and world size Accelerate reports, and yields its
batches on `accelerator.device`. Each checkpoint is a folder `OUT/step-N`; `OUT/latest` names the last one written
whole, so a run killed while saving resumes from the one before. The model is a small convnet that runs on a CPU in
seconds; put yours in its place.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from pipeline import build_loader


def small_convnet(num_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))


class Progress:
    """The step count, saved and restored with the rest (any object with state_dict/load_state_dict can be)."""

    def __init__(self):
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_path", help="a shard set made by tools/make_shards.py (none for --backend synthetic)")
    p.add_argument("--out", required=True, help="folder for the checkpoints")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--backend", default="host", help="the loader's backend: host, dali or synthetic")
    p.add_argument("--workers", type=int, default=2, help="decode processes per rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-every", type=int, default=50, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint OUT/latest names")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even where an accelerator is")
    p.add_argument("--log-labels", metavar="PATH",
                   help="append each step's labels to PATH as JSON lines (.rankN added with several processes)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    accelerator = Accelerator(cpu=args.cpu)
    rank, world = accelerator.process_index, accelerator.num_processes
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(args.seed)
    model = small_convnet(args.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    loader = build_loader(data_path=args.data_path, split="train", backend=args.backend, batch_size=args.batch_size,
                          device=accelerator.device, rank=rank, world_size=world, seed=args.seed,
                          workers=args.workers, img_size=args.img_size, num_classes=args.num_classes)
    progress = Progress()
    accelerator.register_for_checkpointing(loader, progress)
    if args.resume and (out / "latest").exists():
        accelerator.load_state(out / (out / "latest").read_text().strip())
        accelerator.print(f"resumed from {out / 'latest'} at step {progress.step}, epoch {loader.epoch}", flush=True)
    log = None
    if args.log_labels:
        log = open(args.log_labels + (f".rank{rank}" if world > 1 else ""), "a")

    def checkpoint() -> None:
        name = f"step-{progress.step}"
        accelerator.save_state(out / name)  # every process: its random states; the main one: the rest
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            tmp = out / "latest.tmp"
            tmp.write_text(name + "\n")
            os.replace(tmp, out / "latest")
            print(f"checkpoint step {progress.step} -> {out / name}", flush=True)

    with loader:
        for epoch in range(loader.epoch, args.epochs):  # a resumed run starts in the epoch it stopped in
            for images, labels in loader:  # an epoch iterated to its end leaves the loader at the next one
                loss = F.cross_entropy(model(images), labels)
                optimizer.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                optimizer.step()
                progress.step += 1
                if log:
                    log.write(json.dumps({"step": progress.step, "epoch": epoch, "labels": labels.tolist()}) + "\n")
                    log.flush()
                accelerator.print(f"step {progress.step} epoch {epoch} loss {loss.item():.4f}", flush=True)
                if progress.step % args.ckpt_every == 0:
                    checkpoint()
        if progress.step % args.ckpt_every:
            checkpoint()  # the end: a resume of a finished run has nothing left to do
    if log:
        log.close()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
