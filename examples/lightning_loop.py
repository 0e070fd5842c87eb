"""The loader in PyTorch Lightning, resumable mid-epoch: `train_dataloader()` returns it, and since it has
`state_dict()` / `load_state_dict()` (the protocol of torchdata's StatefulDataLoader), Lightning keeps its position in
every checkpoint and restores it with `trainer.fit(..., ckpt_path=...)`.

    python examples/lightning_loop.py --data_path SHARDS --out runs/lightning --epochs 2
    python examples/lightning_loop.py --data_path SHARDS --out runs/lightning --epochs 2 --resume   # after a crash
    python examples/lightning_loop.py --data_path SHARDS --out runs/lightning --devices 2 --cpu    # DDP, 2 processes

A checkpoint taken on one number of devices resumes on another: the loader reads the rest of the interrupted epoch's
samples, split over the devices there are now, and counts that epoch's batches on from the checkpoint's count, as
Lightning does. Lightning takes an epoch's length from len() before it restores the loader, and only once per
loader: two small things below give it the resumed epoch's length, and the whole length after it
(`Classifier.on_load_checkpoint` and `reload_dataloaders_every_n_epochs=1`; on the same number of devices neither
changes anything). The model is a small convnet that runs on a CPU in seconds; put yours in its place.
"""
from __future__ import annotations

import argparse
import json

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from pipeline import build_loader


def small_convnet(num_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))


class Classifier(L.LightningModule):
    def __init__(self, args: argparse.Namespace):
        super().__init__()
        self.args = args
        self.model = small_convnet(args.num_classes)
        self.loader = None  # built by the first train_dataloader() call, where the trainer knows rank and world size
        self.resumed_state = None
        self.log_file = None

    def on_load_checkpoint(self, checkpoint):
        # Lightning restores the loader's position (load_state_dict) only after it has taken the epoch's length from
        # len(), and caps the epoch there. Resumed on more devices, the loader's count for the resumed epoch goes
        # beyond a whole epoch's: train_dataloader() restores the position first, from the same checkpoint.
        loops = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
        states = loops.get("combined_loader", [])
        self.resumed_state = states[0] if states else None

    def train_dataloader(self):
        # One loader for the whole fit: Lightning iterates it once per epoch, and it moves on to the next epoch by
        # itself (Lightning never calls its set_epoch); the rank and world size are the trainer's.
        if self.loader is None:
            a = self.args
            self.loader = build_loader(data_path=a.data_path, split="train", backend=a.backend,
                                       batch_size=a.batch_size, device=self.trainer.strategy.root_device,
                                       rank=self.trainer.global_rank, world_size=self.trainer.world_size,
                                       seed=a.seed, workers=a.workers, img_size=a.img_size,
                                       num_classes=a.num_classes)
            if self.resumed_state is not None:
                self.loader.load_state_dict(self.resumed_state)  # Lightning loads it again later: the same position
        return self.loader

    def training_step(self, batch, batch_idx):
        images, labels = batch
        if self.args.log_labels:
            if self.log_file is None:
                several = self.trainer.world_size > 1
                self.log_file = open(self.args.log_labels + (f".rank{self.global_rank}" if several else ""), "a")
            self.log_file.write(json.dumps({"step": self.global_step + 1, "epoch": self.current_epoch,
                                            "batch_idx": batch_idx, "labels": labels.tolist()}) + "\n")
            self.log_file.flush()
        return F.cross_entropy(self.model(images), labels)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # After the checkpoint callbacks of this step: a run killed from here on resumes from this step's checkpoint.
        if self.trainer.is_global_zero:
            print(f"step {self.global_step} epoch {self.current_epoch} loss {outputs['loss'].item():.4f}", flush=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.args.lr, momentum=0.9)

    def teardown(self, stage):
        if self.loader is not None:
            self.loader.close()  # its decode processes
        if self.log_file is not None:
            self.log_file.close()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_path", help="a shard set made by tools/make_shards.py (none for --backend synthetic)")
    p.add_argument("--out", required=True, help="folder for the checkpoints")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32, help="per device")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--backend", default="host", help="the loader's backend: host, dali or synthetic")
    p.add_argument("--workers", type=int, default=2, help="decode processes per device")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--devices", type=int, default=1, help="more than 1: DDP, one process each")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even where an accelerator is")
    p.add_argument("--ckpt-every", type=int, default=50, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.ckpt when it exists")
    p.add_argument("--log-labels", metavar="PATH",
                   help="append each step's labels to PATH as JSON lines (.rankN added with several devices)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    checkpoints = ModelCheckpoint(dirpath=f"{args.out}/checkpoints", filename="{step}",
                                  every_n_train_steps=args.ckpt_every, save_top_k=-1, save_last=True)
    # reload_dataloaders_every_n_epochs=1: Lightning takes an epoch's batch count from len() when it sets up the
    # loader, and an epoch resumed on another number of devices has another count than the epochs after it.
    # (train_dataloader() hands back the same loader each time.)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu" if args.cpu else "auto", devices=args.devices,
                        strategy="ddp" if args.devices > 1 else "auto", callbacks=[checkpoints],
                        reload_dataloaders_every_n_epochs=1, default_root_dir=args.out, logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Classifier(args), ckpt_path="last" if args.resume else None)
    trainer.save_checkpoint(f"{args.out}/checkpoints/last.ckpt")  # the end: a resume of a finished fit does nothing
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
