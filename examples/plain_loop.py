"""The loader in a plain PyTorch training loop, resumable mid-epoch: its position goes into the checkpoint with the
model and the optimizer, and a resumed run trains on exactly the batches the interrupted one had not finished.

    python examples/plain_loop.py --data_path SHARDS --out runs/plain --epochs 2
    python examples/plain_loop.py --data_path SHARDS --out runs/plain --epochs 2 --resume   # after a crash

Under torchrun (`torchrun --nproc_per_node N examples/plain_loop.py ...`) each process is one rank: DDP on the gloo
backend (nccl on CUDA), each rank reads its share of every epoch, and rank 0 writes the checkpoint. A checkpoint
resumes on another number of processes too: the loader then reads the samples of the interrupted epoch that no rank
has read yet. The model is a small convnet so that the example runs on a CPU in seconds; put yours in its place.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipeline import build_loader


def small_convnet(num_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))


def save_atomically(state: dict, path: Path) -> None:
    """A crash while writing leaves the previous checkpoint whole."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_path", help="a shard set made by tools/make_shards.py (none for --backend synthetic)")
    p.add_argument("--out", required=True, help="folder for checkpoint.pt")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--backend", default="host", help="the loader's backend: host, dali or synthetic")
    p.add_argument("--workers", type=int, default=2, help="decode processes per rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-every", type=int, default=50, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt when it exists")
    p.add_argument("--log-labels", metavar="PATH",
                   help="append each step's labels to PATH as JSON lines (.rankN added under torchrun)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    distributed = "WORLD_SIZE" in os.environ  # started by torchrun
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"

    torch.manual_seed(args.seed)
    model = small_convnet(args.num_classes).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    loader = build_loader(data_path=args.data_path, split="train", backend=args.backend, batch_size=args.batch_size,
                          device=device, rank=rank, world_size=world, seed=args.seed, workers=args.workers,
                          img_size=args.img_size, num_classes=args.num_classes)
    step = 0
    if args.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        loader.load_state_dict(ckpt["loader"])  # the next iteration yields the rest of the interrupted epoch
        step = ckpt["step"]
        print(f"resumed from {ckpt_path} at step {step}, epoch {loader.epoch}", flush=True)
    trained = nn.parallel.DistributedDataParallel(model) if distributed else model
    log = None
    if args.log_labels:
        log = open(args.log_labels + (f".rank{rank}" if distributed else ""), "a")

    def checkpoint() -> None:
        if rank == 0:  # the loader's state describes every rank's position (the same step on each)
            save_atomically({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "loader": loader.state_dict(), "step": step}, ckpt_path)
            print(f"checkpoint step {step} -> {ckpt_path}", flush=True)

    with loader:
        for epoch in range(loader.epoch, args.epochs):  # a resumed run starts in the epoch it stopped in
            for images, labels in loader:  # an epoch iterated to its end leaves the loader at the next one
                loss = F.cross_entropy(trained(images), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                if log:
                    log.write(json.dumps({"step": step, "epoch": epoch, "labels": labels.tolist()}) + "\n")
                    log.flush()
                if rank == 0:
                    print(f"step {step} epoch {epoch} loss {loss.item():.4f}", flush=True)
                if step % args.ckpt_every == 0:
                    checkpoint()
        if step % args.ckpt_every:
            checkpoint()  # the end: a resume of a finished run has nothing left to do
    if log:
        log.close()
    if distributed:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
