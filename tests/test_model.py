"""model/: timm's ViT built locally, local checkpoints loaded with head re-initialisation, FLOPs that match a
counter."""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from model import CheckpointMismatch, build_model, flops_per_image, load_pretrained, model_defaults


def test_build_model_is_local_and_sized():
    net = build_model("test_vit", num_classes=4, img_size=32)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 4)


def test_flops_match_a_counted_forward():
    net = build_model("test_vit", num_classes=4, img_size=32).eval()
    # The math attention kernel decomposes into matmuls the counter sees (the fused CPU kernel is not counted).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.zeros(1, 3, 32, 32))
    assert flops_per_image(net) == pytest.approx(counter.get_total_flops(), rel=1e-3)


def test_vit_b32_flops_from_name():
    # timm lists vit_base_patch32_224 at 4.4 GMACs, i.e. ~8.8 GFLOPs forward.
    assert flops_per_image("vit_base_patch32_224") == pytest.approx(8.8e9, rel=0.02)
    assert flops_per_image("vit_base_patch32_224", 384) > 2.5 * flops_per_image("vit_base_patch32_224")


def test_model_defaults_without_download():
    d = model_defaults("vit_base_patch32_224")
    assert d["mean"] == (0.5, 0.5, 0.5) and d["std"] == (0.5, 0.5, 0.5) and d["crop_pct"] == 0.9
    assert model_defaults("no_such_model")["crop_pct"] == 0.875  # timm's ImageNet defaults


def test_pretrained_strips_wrappers_and_reinits_other_head(tmp_path):
    src = build_model("test_vit", num_classes=4, img_size=32)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": {f"module._orig_mod.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}, path)
    same = build_model("test_vit", num_classes=4, img_size=32, pretrained=str(path))
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in same.state_dict().items())
    other = build_model("test_vit", num_classes=10, img_size=32)
    assert load_pretrained(other, str(path)) == ["head.bias", "head.weight"]
    assert torch.equal(other.pos_embed, src.pos_embed) and other.head.weight.shape == (10, 64)


def test_pretrained_from_another_architecture_is_an_error(tmp_path):
    path = tmp_path / "wide.pth"
    torch.save(build_model("test_vit3", num_classes=4, img_size=32).state_dict(), path)
    with pytest.raises(CheckpointMismatch, match="wide.pth"):
        build_model("test_vit", num_classes=4, img_size=32, pretrained=str(path))
