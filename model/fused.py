"""Step-speed adaptations of timm's ViT that keep its function: same outputs within floating-point tolerance.

`PixelInput` folds the input normalization into the patch embedding, so the model eats raw 0..255 pixels (uint8
from the pipeline) and the device skips the per-batch normalize kernels and a float copy of every image. Exact
because the patch embedding is linear: W * ((x/255 - mean)/std) + b = (W / (255 std)) * x + (b - W * mean/std).
"""
from __future__ import annotations

import torch
from torch import nn


def _stats(mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1),
            torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1))


@torch.no_grad()
def fold_normalization(proj: nn.Conv2d, mean, std) -> None:
    """Rewrite a patch-embedding conv in place so it takes 0..255 pixels instead of normalized ones."""
    mean, std = _stats(mean, std)
    w = proj.weight.double()
    bias = proj.bias.double() if proj.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    # The bias absorbs the mean: every tap of the kernel sees the same per-channel offset.
    bias = bias - (w * (mean / std)).sum(dim=(1, 2, 3))
    proj.weight.copy_((w / (255 * std)).to(proj.weight.dtype))
    if proj.bias is None:
        proj.bias = nn.Parameter(bias.to(proj.weight.dtype))
    else:
        proj.bias.copy_(bias.to(proj.bias.dtype))


class PixelInput(nn.Module):
    """Wraps a timm ViT whose patch embedding was folded: takes uint8 (or float 0..255) NCHW pixels."""

    def __init__(self, vit: nn.Module, mean, std):
        super().__init__()
        fold_normalization(vit.patch_embed.proj, mean, std)
        self.vit = vit
        self.mean, self.std = tuple(mean), tuple(std)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # uint8 -> the conv's dtype; integers 0..255 are exact in bf16/fp16, so nothing is lost under autocast.
        return self.vit(pixels.to(self.vit.patch_embed.proj.weight.dtype))

    def timm_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights as timm's own model expects them (normalized input): the fold undone, for checkpoints that
        `timm.create_model(name, checkpoint_path=...)` must load."""
        state = {k: v.detach().clone() for k, v in self.vit.state_dict().items()}
        mean, std = _stats(self.mean, self.std)
        w = state["patch_embed.proj.weight"].double() * (255 * std)
        state["patch_embed.proj.bias"] = (state["patch_embed.proj.bias"].double()
                                          + (w * (mean / std)).sum(dim=(1, 2, 3))).to(state["patch_embed.proj.bias"].dtype)
        state["patch_embed.proj.weight"] = w.to(state["patch_embed.proj.weight"].dtype)
        return state
