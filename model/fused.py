"""Step-speed adaptations of timm's ViT that keep its function, its parameters and its training dynamics.

`use_pixel_input` lets the model eat raw 0..255 pixels (uint8 from the pipeline): the input normalization moves into
the patch embedding, so the device skips the per-batch normalize kernels and the float copy of every image, and the
host ships one byte per pixel. The patch embedding is linear, so
    W * ((x/255 - mean)/std) + b  =  (W / (255 std)) * x + (b - sum W * mean/std).
The fold is applied to the weights on the fly in every forward (2.4 M weights for ViT-B/32, against 38 M input values
at batch 256) rather than baked into them: the parameters stay timm's, so checkpoints load into timm unchanged and
the optimizer sees exactly the gradients it would with normalized input (a baked fold would rescale the patch
embedding's effective learning rate by 255 std under Adam).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PixelConv2d(nn.Conv2d):
    """A patch-embedding conv that takes 0..255 pixels and computes what the original conv computes on normalized
    ones. Same parameters and state-dict keys as the nn.Conv2d it replaces; the fold constants are not saved."""

    def __init__(self, conv: nn.Conv2d, mean, std):
        # On "meta": nothing allocated or initialised (no draw from the global RNG), as the original's weights replace
        # them at once.
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, device="meta",
                         dtype=conv.weight.dtype)
        self.weight, self.bias = conv.weight, conv.bias  # the same Parameter objects: optimizers built later see them
        # On the weight's device: the model may already sit on its accelerator when it is adapted.
        std = torch.tensor(std, dtype=torch.float32, device=conv.weight.device).view(1, -1, 1, 1)
        mean = torch.tensor(mean, dtype=torch.float32, device=conv.weight.device).view(1, -1, 1, 1)
        self.register_buffer("scale", 1 / (255 * std), persistent=False)
        self.register_buffer("shift", mean / std, persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        weight = self.weight * self.scale
        # Every tap of the kernel sees the same per-channel offset, so the mean folds into the bias.
        offset = (self.weight * self.shift).sum(dim=(1, 2, 3))
        bias = -offset if self.bias is None else self.bias - offset
        # uint8 -> float: integers 0..255 are exact in bf16/fp16 too, so autocast loses nothing here.
        return F.conv2d(pixels.to(weight.dtype), weight, bias, self.stride, self.padding, self.dilation, self.groups)


def use_pixel_input(vit: nn.Module, mean, std) -> nn.Module:
    """Make a timm ViT take uint8 NCHW pixels in place of normalized floats; returns the same model."""
    vit.patch_embed.proj = PixelConv2d(vit.patch_embed.proj, mean, std)
    return vit
