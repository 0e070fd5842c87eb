"""Analytic FLOPs of a timm VisionTransformer, for MFU logging. Counts the forward pass's matrix multiplications
(2 FLOPs per multiply-add): patch embedding, q/k/v and output projections, the two attention products, the MLP and
the head. Norms, softmax, GELU and adds are left out, as MFU conventionally does; training costs about 3x forward
(the backward pass computes gradients for both inputs and weights)."""
from __future__ import annotations

import timm
import torch

TRAIN_FLOPS_FACTOR = 3


def flops_per_image(model: str | torch.nn.Module, img_size: int | None = None) -> float:
    """Forward FLOPs for one image. `model` is a VisionTransformer or a timm model name (built on the meta device:
    no memory, no weights). `img_size` defaults to the model's own."""
    if isinstance(model, str):
        with torch.device("meta"):
            kw = {"img_size": img_size} if img_size else {}
            model = timm.create_model(model, pretrained=False, **kw)
    if not hasattr(model, "patch_embed") or not hasattr(model, "blocks"):
        raise TypeError(f"flops_per_image counts ViT-style models (patch_embed + blocks), not {type(model).__name__}")
    pe = model.patch_embed
    ph, pw = pe.patch_size
    h, w = (img_size, img_size) if img_size else pe.img_size
    patches = (h // ph) * (w // pw)
    tokens = patches + getattr(model, "num_prefix_tokens", 1)
    dim = model.embed_dim
    in_chans = pe.proj.in_channels
    flops = 2 * patches * (in_chans * ph * pw) * dim  # patch embedding conv = one matmul per patch
    for block in model.blocks:
        hidden = block.mlp.fc1.out_features
        flops += 2 * tokens * dim * 3 * dim  # q, k, v projections
        flops += 2 * 2 * tokens * tokens * dim  # q @ k^T and attn @ v, over all heads together
        flops += 2 * tokens * dim * dim  # output projection
        flops += 2 * 2 * tokens * dim * hidden  # fc1 and fc2
    head = getattr(model, "head", None)
    if isinstance(head, torch.nn.Linear):
        flops += 2 * head.in_features * head.out_features  # on the pooled token only
    return float(flops)
