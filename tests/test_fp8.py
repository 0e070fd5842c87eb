"""model/fp8.py: FP8 linears stay close to the full-precision ones, keep the parameters, and fall back when unaligned.
FP8 matmuls run on the CPU too (torch._scaled_mm), so the numerics are tested here; their speed needs a GPU."""
import pytest
import timm
import torch
from torch import nn

from model.fp8 import Float8Linear, fp8_supported, quantize, use_fp8


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_quantize_round_trips_within_fp8_precision():
    t = torch.randn(64, 64) * 37
    q, inv_scale = quantize(t, torch.float8_e4m3fn)
    assert q.dtype == torch.float8_e4m3fn
    assert q.float().abs().max() == pytest.approx(torch.finfo(torch.float8_e4m3fn).max)  # full range used
    assert rel(q.float() * inv_scale, t) < 0.05  # e4m3: 3 mantissa bits


@pytest.mark.parametrize("autocast", [True, False])
def test_forward_and_gradients_track_the_full_precision_linear(autocast):
    torch.manual_seed(0)
    linear = nn.Linear(64, 96)
    fp8 = Float8Linear(linear)
    x = torch.randn(2, 48, 64, requires_grad=True)  # 96 tokens: 16-aligned
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y8, y = fp8(x), linear(x)
    assert y8.dtype == y.dtype and y8.shape == y.shape
    assert rel(y8, y) < 0.08
    g = torch.randn(y.shape)
    gx8, gw8, gb8 = torch.autograd.grad(y8.float(), [x, linear.weight, linear.bias], g)
    gx, gw, gb = torch.autograd.grad(y.float(), [x, linear.weight, linear.bias], g)
    assert gw8.dtype == linear.weight.dtype
    assert rel(gx8, gx) < 0.12 and rel(gw8, gw) < 0.12 and rel(gb8, gb) < 0.02
    # Not a disguised full-precision path: the FP8 rounding shows.
    assert rel(y8, y) > 1e-4


def test_unaligned_token_counts_fall_back_exactly():
    linear = nn.Linear(32, 32)
    x = torch.randn(3, 5, 32)  # 15 tokens
    assert torch.equal(Float8Linear(linear)(x), linear(x))


def test_vit_swaps_block_linears_only_and_keeps_its_state_dict():
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10, depth=2)
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    params = [id(p) for p in vit.parameters()]
    assert use_fp8(vit) == 2 * 4  # qkv, proj, fc1, fc2 per block
    assert type(vit.head) is nn.Linear  # 10 outputs: not 16-aligned, and the logits stay precise
    assert [id(p) for p in vit.parameters()] == params  # an optimizer built before or after sees the same tensors
    after = vit.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    x = torch.randn(16, 3, 32, 32)  # 16 x 5 tokens: the FP8 path, not the fallback
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = vit(x).float().logsumexp(1).mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in vit.parameters())


def test_support_check():
    assert fp8_supported(torch.device("cpu")) is None
    assert "not supported" in fp8_supported(torch.device("meta"))


@pytest.mark.gpu
def test_cuda_fp8_linear_matches_cpu_fp8():
    torch.manual_seed(0)
    linear = nn.Linear(128, 256)
    x = torch.randn(64, 128)
    cpu = Float8Linear(linear)(x)
    gpu = Float8Linear(linear.cuda())(x.cuda())
    assert rel(gpu.cpu(), cpu) < 1e-2


def test_operands_have_the_layouts_cuda_requires(monkeypatch):
    """The CPU's _scaled_mm takes any layout, CUDA's only a row-major first and a column-major second operand:
    check every call here, non-contiguous input included, so a layout slip cannot hide until a GPU run."""
    real, calls = torch._scaled_mm, []

    def strict(a, b, **kw):
        assert a.is_contiguous(), "first operand must be row-major"
        assert b.t().is_contiguous(), "second operand must be column-major"
        calls.append(a.shape)
        return real(a, b, **kw)

    monkeypatch.setattr(torch, "_scaled_mm", strict)
    linear = nn.Linear(32, 48)
    x = torch.randn(32, 2, 16).permute(1, 2, 0).requires_grad_()  # (2, 16, 32), not contiguous
    y = Float8Linear(linear)(x)
    y.backward(torch.randn(48, 16, 2).permute(2, 1, 0))  # a non-contiguous gradient too
    assert len(calls) == 3  # forward, grad_x, grad_w


def test_swapping_draws_no_random_numbers():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10, depth=1)
    state = torch.get_rng_state()
    use_fp8(vit)
    assert torch.equal(torch.get_rng_state(), state)
