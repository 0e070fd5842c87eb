"""Opt-in FP8 linears for the transformer blocks (`--fp8`): faster matmuls on Hopper and newer, lossy, off by default.

Each eligible nn.Linear runs its forward and both backward matmuls in FP8 with one scale per tensor, recomputed from
the tensor's absolute maximum at every step ("dynamic tensorwise" scaling): activations and weights in e4m3,
gradients in e5m2 (more range, less precision), products accumulated in fp32 by `torch._scaled_mm`, outputs in the
autocast dtype. Master weights, optimizer state and the state dict are untouched, so checkpoints move freely between
FP8 and bf16 runs, and evaluation can run either way.

Why not torchao's float8 training, which implements this same recipe: each torchao release supports a narrow range
of torch versions, and this project runs on torch from 2.11 up and on torch_npu. The recipe is small enough to own;
tests/test_fp8.py holds it against the full-precision linear.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
# cuBLAS's FP8 matmul wants every dimension a multiple of 16; the token count is checked per call.
ALIGN = 16


def quantize(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`t` scaled so its largest magnitude lands on the format's largest value, cast; and the scale to undo that."""
    amax = t.detach().abs().amax().float().clamp(min=1e-12)
    scale = torch.finfo(dtype).max / amax
    fp8 = (t.float() * scale).clamp(torch.finfo(dtype).min, torch.finfo(dtype).max).to(dtype)
    return fp8, scale.reciprocal()


def column_major(t: torch.Tensor) -> torch.Tensor:
    """The same matrix stored column by column: the layout `_scaled_mm` wants for its second operand."""
    return t.t().contiguous().t()


class _Float8Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        xq, xs = quantize(x2d.contiguous(), E4M3)  # row-major: cuBLAS's FP8 matmul takes no other first operand
        wq, ws = quantize(weight, E4M3)
        ctx.save_for_backward(xq, xs, wq, ws)  # FP8 copies: a quarter of what a fp32 save would hold
        ctx.out_dtype, ctx.weight_dtype = out_dtype, weight.dtype
        return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws, out_dtype=out_dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        xq, xs, wq, ws = ctx.saved_tensors
        gq, gs = quantize(grad.contiguous(), E5M2)
        # dL/dx = g W: (M x N) @ (N x K).   dL/dW = g^T x: (N x M) @ (M x K), accumulated over the M tokens.
        grad_x = torch._scaled_mm(gq, column_major(wq), scale_a=gs, scale_b=ws, out_dtype=ctx.out_dtype)
        grad_w = torch._scaled_mm(gq.t().contiguous(), column_major(xq), scale_a=gs, scale_b=xs,
                                  out_dtype=ctx.weight_dtype)
        return grad_x, grad_w, None


class Float8Linear(nn.Linear):
    """nn.Linear whose matmuls run in FP8. Same parameters (the very objects) and state-dict keys as the original.
    Falls back to the plain linear when the token count is not a multiple of 16 (cuBLAS's FP8 alignment)."""

    def __init__(self, linear: nn.Linear):
        # On "meta": no weights allocated and initialised (that would draw from the global RNG and shift every
        # random stream after it), as they are replaced by the original's at once.
        super().__init__(linear.in_features, linear.out_features, linear.bias is not None, device="meta",
                         dtype=linear.weight.dtype)
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)
        if x2d.shape[0] % ALIGN:
            return F.linear(x, self.weight, self.bias)
        kind = x.device.type
        out_dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        y = _Float8Matmul.apply(x2d, self.weight, out_dtype)
        if self.bias is not None:
            y = y + self.bias.to(out_dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


def eligible(name: str, module: nn.Module) -> bool:
    """Linears inside the transformer blocks whose sizes FP8 matmuls accept. The classifier head stays in bf16 (its
    1,000 outputs are not 16-aligned, and the logits are where precision matters most); so does the patch embedding
    (a conv that folds input normalization, model/fused.py)."""
    return (type(module) is nn.Linear and name.startswith("blocks.")
            and module.in_features % ALIGN == 0 and module.out_features % ALIGN == 0)


def use_fp8(model: nn.Module) -> int:
    """Swap the eligible linears of a timm ViT for Float8Linear, in place; returns how many were swapped."""
    targets = [(name, m) for name, m in model.named_modules() if eligible(name, m)]
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, Float8Linear(linear))
    return len(targets)


def fp8_supported(device: torch.device) -> str | None:
    """None when FP8 matmuls run on `device`, else why not. CUDA needs compute capability 8.9+ (Ada, Hopper, later);
    the CPU runs them (slowly: for tests and curves); other accelerators are not supported."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return None if (major, minor) >= (8, 9) else f"FP8 matmuls need compute capability 8.9+, {device} has " \
                                                     f"{major}.{minor}"
    return None if device.type == "cpu" else f"FP8 linears are not supported on {device.type}"
