"""model/fused.py: folding normalization into the patch embedding must not change what the model computes."""
import copy

import pytest
import timm
import torch

from model.fused import PixelInput

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # unequal per channel, so a channel mix-up shows


def tiny_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10, depth=2).eval()


def normalized(pixels):
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (pixels.float() / 255 - mean) / std


def test_pixel_input_matches_timm_on_normalized_input():
    vit = tiny_vit()
    reference = copy.deepcopy(vit)
    model = PixelInput(vit, MEAN, STD).eval()
    pixels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(model(pixels), reference(normalized(pixels)), atol=1e-4, rtol=1e-4)


def test_pixel_input_under_bf16_autocast_stays_close():
    vit = tiny_vit()
    reference = copy.deepcopy(vit)
    model = PixelInput(vit, MEAN, STD).eval()
    pixels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = model(pixels).float(), reference(normalized(pixels)).float()
    # bf16 keeps ~3 significant digits; both paths round differently, so compare at that precision.
    assert (ours - theirs).abs().max() < 0.05 * theirs.abs().max()


def test_timm_state_dict_undoes_the_fold():
    vit = tiny_vit()
    reference = copy.deepcopy(vit)
    model = PixelInput(vit, MEAN, STD)
    state = model.timm_state_dict()
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(state[name], tensor, atol=1e-6, rtol=1e-5, msg=name)


def test_fold_changes_the_weights():
    vit = tiny_vit()
    before = vit.patch_embed.proj.weight.clone()
    PixelInput(vit, MEAN, STD)
    assert not torch.allclose(before, vit.patch_embed.proj.weight)


@pytest.mark.parametrize("bias", [True, False])
def test_fold_handles_a_conv_without_bias(bias):
    from model.fused import fold_normalization
    conv = torch.nn.Conv2d(3, 8, 4, stride=4, bias=bias)
    reference = copy.deepcopy(conv)
    fold_normalization(conv, MEAN, STD)
    pixels = torch.randint(0, 256, (2, 3, 8, 8)).float()
    torch.testing.assert_close(conv(pixels), reference(normalized(pixels)), atol=1e-4, rtol=1e-4)
