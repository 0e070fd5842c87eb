"""trainlib/optim.py: the warm-up meets the cosine at the peak LR, a resume on a run of another length keeps the
checkpoint's moments while its LR follows this run's schedule from the given step; layer decay gives timm's group
LRs, micro-batches step as one large batch, and the loss is timm train.py's choice."""
from __future__ import annotations

import contextlib

import pytest
import timm
import timm.optim
import torch
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy

from trainlib.config import TrainConfig
from trainlib.devices import Device
from trainlib.optim import OptimStep, build_loss, build_optimizer, build_scheduler

CPU = Device("cpu")


def optim_step(cfg: TrainConfig, steps_per_epoch: int) -> OptimStep:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = build_optimizer(cfg, model, CPU)
    return OptimStep(model=model, raw_model=model, optimizer=optimizer,
                     scheduler=build_scheduler(cfg, optimizer, steps_per_epoch), device=CPU, amp_dtype=torch.float32,
                     clip_grad=cfg.clip_grad, loss_fn=build_loss(cfg))


def train(step: OptimStep, n: int) -> list[float]:
    """The LR each of `n` steps used."""
    lrs = []
    for _ in range(n):
        lrs.append(step.lr)
        step(torch.randn(2, 4), torch.tensor([0, 2]))
    return lrs


def test_the_warm_up_reaches_the_peak_where_the_cosine_takes_over():
    cfg = TrainConfig(epochs=2, lr=1e-2, warmup_steps=4, min_lr=1e-4)
    lrs = train(optim_step(cfg, steps_per_epoch=5), 10)
    assert lrs[:5] == pytest.approx([k / 5 * 1e-2 for k in range(1, 6)])  # the ramp ends on the peak
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:]))  # from there a strict descent


def test_a_schedule_recomputed_on_resume_is_this_runs_while_the_moments_are_the_checkpoints():
    short = optim_step(TrainConfig(epochs=2, lr=1e-2, warmup_steps=2), steps_per_epoch=3)
    train(short, 6)
    saved = short.state_dict()
    longer = TrainConfig(epochs=3, lr=1e-2, warmup_steps=2)
    resumed, fresh = optim_step(longer, steps_per_epoch=3), optim_step(longer, steps_per_epoch=3)
    resumed.load_state_dict(saved, schedule_at=6)
    moments = saved["optimizer"]["state"][0]["exp_avg"]
    assert torch.equal(resumed.optimizer.state_dict()["state"][0]["exp_avg"], moments)
    recomputed = train(resumed, 3)
    assert recomputed == pytest.approx(train(fresh, 9)[6:])
    exact = optim_step(TrainConfig(epochs=2, lr=1e-2, warmup_steps=2), steps_per_epoch=3)
    exact.load_state_dict(saved)  # the checkpoint's own schedule, where it stopped: the end of its decay
    assert exact.lr == pytest.approx(short.lr) and exact.lr < recomputed[0]


def vit():
    torch.manual_seed(0)
    return timm.create_model("test_vit", num_classes=5, img_size=32)


def test_layer_decay_groups_get_timms_learning_rates():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-5, weight_decay=0.05, layer_decay=0.65, epochs=1, warmup_steps=2)
    model = vit()
    optimizer = build_optimizer(cfg, model, CPU)
    names = {id(p): n for n, p in model.named_parameters()}
    ref_model = vit()
    reference = timm.optim.create_optimizer_v2(ref_model, opt="adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.65)
    ref_names = {id(p): n for n, p in ref_model.named_parameters()}
    want = {ref_names[id(p)]: (g["lr"] * g["lr_scale"], g["weight_decay"]) for g in reference.param_groups
            for p in g["params"]}
    got = {names[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    assert got.keys() == want.keys() and len({lr for lr, _ in got.values()}) > 2
    for name, (lr, wd) in got.items():
        assert lr == pytest.approx(want[name][0]) and wd == want[name][1], name
    assert got["head.weight"][0] == pytest.approx(1e-3) and got["patch_embed.proj.weight"][0] < 1e-3 * 0.65 ** 2
    # The schedule moves every group by the same factor: the min LR scales with the group (timm's rule).
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch=10)
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    for g in optimizer.param_groups:
        assert g["lr"] == pytest.approx(1e-5 * g["lr_scale"])


@pytest.mark.parametrize("opt, clip", [("sgd", 0.0), ("sgd", 0.5), ("adamw", 0.5)])
def test_four_micro_batches_step_as_one_batch_four_times_larger(opt, clip):
    cfg = TrainConfig(opt=opt, lr=1e-2, clip_grad=clip, epochs=1, warmup_steps=0)
    images, labels = torch.randn(16, 3, 32, 32), torch.randint(0, 5, (16,))
    steps = []
    for chunks in (1, 4):
        model = vit()
        optimizer = build_optimizer(cfg, model, CPU)
        step = OptimStep(model=model, raw_model=model, optimizer=optimizer,
                         scheduler=build_scheduler(cfg, optimizer, 10), device=CPU, amp_dtype=torch.float32,
                         clip_grad=clip, loss_fn=build_loss(cfg))
        loss = step.accumulate(list(zip(images.chunk(chunks), labels.chunk(chunks))))
        steps.append((model, loss))
    (whole, loss_whole), (accumulated, loss_accumulated) = steps
    assert loss_accumulated.item() == pytest.approx(loss_whole.item(), abs=1e-6)
    for a, b in zip(whole.parameters(), accumulated.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-6)  # the (clipped) gradients of the step
        if opt == "sgd":  # linear in the gradient; Adam's first step divides each gradient by its own magnitude
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not torch.equal(next(vit().parameters()), next(whole.parameters()))  # the step moved the weights


def test_micro_batches_other_than_the_last_skip_the_gradient_all_reduce():
    cfg = TrainConfig(epochs=1)
    model = vit()
    optimizer = build_optimizer(cfg, model, CPU)
    forwards, inside = [], []

    @contextlib.contextmanager
    def no_sync():
        inside.append(len(forwards))  # the micro-batch whose forward and backward run without the all-reduce
        yield

    model.register_forward_hook(lambda *_: forwards.append(1))
    step = OptimStep(model=model, raw_model=model, optimizer=optimizer, scheduler=build_scheduler(cfg, optimizer, 9),
                     device=CPU, amp_dtype=torch.float32, clip_grad=1.0, loss_fn=build_loss(cfg), no_sync=no_sync)
    step.accumulate([(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))] * 3)
    assert inside == [0, 1] and len(forwards) == 3


@pytest.mark.parametrize("warmup", [0, 3])
def test_the_schedule_has_the_values_of_the_schedulers_it_replaced(warmup):
    cfg = TrainConfig(epochs=2, lr=1e-2, min_lr=1e-4, warmup_steps=warmup, warmup_epochs=0)
    lrs = train(optim_step(cfg, steps_per_epoch=6), 12)
    old = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1e-2)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(old, T_max=12 - warmup, eta_min=1e-4)
    if warmup:
        ramp = torch.optim.lr_scheduler.LinearLR(old, start_factor=1 / (warmup + 1), total_iters=warmup)
        cosine = torch.optim.lr_scheduler.SequentialLR(old, [ramp, cosine], milestones=[warmup])
    want = []
    for _ in range(12):
        want.append(old.param_groups[0]["lr"])
        old.step()
        cosine.step()
    assert lrs == pytest.approx(want, rel=1e-9)


def test_an_older_checkpoints_schedule_object_is_recomputed_at_its_step():
    cfg = TrainConfig(epochs=2, lr=1e-2, warmup_steps=2)
    step = optim_step(cfg, steps_per_epoch=5)
    state = step.state_dict()
    state["scheduler"] = {"_milestones": [2], "last_epoch": 4, "_schedulers": []}  # a SequentialLR's keys
    resumed = optim_step(cfg, steps_per_epoch=5)
    resumed.load_state_dict(state)
    assert resumed.lr == pytest.approx(train(optim_step(cfg, steps_per_epoch=5), 5)[-1])  # after 4 steps
    assert resumed.lr != pytest.approx(optim_step(cfg, steps_per_epoch=5).lr)


def test_a_checkpoint_of_another_parameter_grouping_is_one_line():
    from trainlib.checkpoint import CheckpointError

    plain = build_optimizer(TrainConfig(), vit(), CPU)
    model, cfg = vit(), TrainConfig(layer_decay=0.7)
    decayed = OptimStep(model=model, raw_model=model, optimizer=build_optimizer(cfg, model, CPU), scheduler=None,
                        device=CPU, amp_dtype=torch.float32, clip_grad=0, loss_fn=build_loss(cfg))
    with pytest.raises(CheckpointError, match="layer-decay"):
        decayed.load_state_dict({"optimizer": plain.state_dict(), "scaler": {}, "scheduler": {}})


def test_bce_sum_sums_over_classes():
    logits, labels = torch.randn(4, 6), torch.tensor([0, 1, 2, 3])
    mean = build_loss(TrainConfig(bce_loss=True, label_smoothing=0.0))(logits, labels)
    summed = build_loss(TrainConfig(bce_loss=True, bce_sum=True, label_smoothing=0.0))(logits, labels)
    assert summed.item() == pytest.approx(6 * mean.item())


@pytest.mark.parametrize("flags, kind", [({}, "ce"), ({"mixup": 0.8}, SoftTargetCrossEntropy),
                                         ({"bce_loss": True}, BinaryCrossEntropy),
                                         ({"cutmix": 1.0, "bce_loss": True}, BinaryCrossEntropy)])
def test_the_loss_is_timms_choice(flags, kind):
    loss = build_loss(TrainConfig(**flags))
    if kind == "ce":
        logits, labels = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
        assert loss(logits, labels) == pytest.approx(torch.nn.functional.cross_entropy(
            logits, labels, label_smoothing=0.1).item())
    else:
        assert isinstance(loss, kind)
