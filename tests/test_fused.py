"""model/fused.py: pixel input must compute what timm's model computes on normalized input, and train it the same."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

from model.fused import PixelConv2d, use_pixel_input

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # unequal per channel, so a channel mix-up shows


def tiny_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10, depth=2)


def normalized(pixels):
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (pixels.float() / 255 - mean) / std


def pixels(n=4):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def test_outputs_match_timm_on_normalized_input():
    reference = tiny_vit().eval()
    model = use_pixel_input(copy.deepcopy(reference), MEAN, STD).eval()
    x = pixels()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(normalized(x)), atol=1e-4, rtol=1e-4)


def test_gradients_match_so_training_is_the_same():
    reference = tiny_vit()
    model = use_pixel_input(copy.deepcopy(reference), MEAN, STD)
    x, y = pixels(), torch.arange(4)
    F.cross_entropy(reference(normalized(x)), y).backward()
    F.cross_entropy(model(x), y).backward()
    grads = dict(model.named_parameters())
    for name, p in reference.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_state_dict_is_timms_own():
    reference = tiny_vit()
    model = use_pixel_input(copy.deepcopy(reference), MEAN, STD)
    state = model.state_dict()
    assert state.keys() == reference.state_dict().keys()  # fold constants are not saved
    fresh = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10, depth=2)
    fresh.load_state_dict(state)  # strict: a checkpoint of ours loads into plain timm


def test_bf16_autocast_stays_close():
    reference = tiny_vit().eval()
    model = use_pixel_input(copy.deepcopy(reference), MEAN, STD).eval()
    x = pixels()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = model(x).float(), reference(normalized(x)).float()
    # bf16 keeps ~3 significant digits and the two paths round differently: compare at that precision.
    assert (ours - theirs).abs().max() < 0.05 * theirs.abs().max()


@pytest.mark.parametrize("bias", [True, False])
def test_conv_with_and_without_bias(bias):
    conv = torch.nn.Conv2d(3, 8, 4, stride=4, bias=bias)
    folded = PixelConv2d(conv, MEAN, STD)
    assert folded.weight is conv.weight  # the same parameter, not a copy
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    torch.testing.assert_close(folded(x), conv(normalized(x)), atol=1e-4, rtol=1e-4)


def test_fold_constants_follow_a_model_already_on_its_device():
    # train.py moves the model to the accelerator before adapting it; "meta" stands in for one here.
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10, depth=1).to("meta")
    conv = use_pixel_input(vit, MEAN, STD).patch_embed.proj
    assert conv.scale.device.type == conv.shift.device.type == conv.weight.device.type == "meta"


def test_adapting_draws_no_random_numbers():
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", img_size=32, num_classes=4)
    state = torch.get_rng_state()
    use_pixel_input(vit, (0.5,) * 3, (0.5,) * 3)
    assert torch.equal(torch.get_rng_state(), state)
