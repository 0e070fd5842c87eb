"""Exact evaluation: Acc@1 / Acc@5 over the whole val split, each rank on its share. The loaders pad the last
batches with label -1 so every rank runs equal steps; `TopK` skips those and sums the counts over ranks."""
from __future__ import annotations

import torch
import torch.distributed as dist


class TopK:
    """Exact Acc@1/Acc@5 over a sharded val set: counts stay on the device, one all_reduce sums them over ranks.
    Labels of -1 (the loaders' padding, so every rank runs equal steps) are skipped."""

    def __init__(self, device: torch.device, num_classes: int):
        self.k = min(5, num_classes)
        self.counts = torch.zeros(3, dtype=torch.int64, device=device)  # correct@1, correct@k, samples

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        real = labels >= 0
        top = logits.topk(self.k, dim=1).indices
        hit = top == labels.unsqueeze(1)
        self.counts += torch.stack([(hit[:, 0] & real).sum(), (hit.any(dim=1) & real).sum(), real.sum()])

    def result(self) -> tuple[float, float, int]:
        if dist.is_initialized():
            dist.all_reduce(self.counts)
        c1, ck, n = self.counts.tolist()  # sync: the only one of the evaluation pass
        return 100.0 * c1 / max(n, 1), 100.0 * ck / max(n, 1), n


@torch.no_grad()
def exact_accuracies(models, loader, device, amp_dtype: torch.dtype,
                     num_classes: int) -> list[tuple[float, float, int]]:
    """(Acc@1, Acc@5, samples counted) of each model over every batch of `loader`, in one pass (the EMA weights
    beside the trained ones: each batch is read and decoded once); a collective. The models are in eval mode for
    the pass and back in train mode after it."""
    for model in models:
        model.eval()
    counts = [TopK(device.device, num_classes) for _ in models]
    for images, labels in loader:
        for model, topk in zip(models, counts):
            with device.autocast(amp_dtype):
                logits = model(images)
            topk.update(logits, labels)
    for model in models:
        model.train()
    return [topk.result() for topk in counts]
