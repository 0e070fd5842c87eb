"""trainlib/build.py: the model a resolution schedule needs, and torch.compile's graphs under one."""
from __future__ import annotations

import functools

import torch

from trainlib import build, devices
from trainlib.config import TrainConfig

RAMP = dict(model="test_vit", img_size=48, min_res=16, start_ramp=0, end_ramp=2, epochs=3, device="cpu",
            backend="synthetic", num_classes=4)


def test_a_ramp_compiles_one_static_graph_per_side_and_mode(monkeypatch):
    # dynamo's own choice at a second shape would be one dynamic-shape graph that every later side reuses: 2 graphs
    # for the three train sides, not 3. The eager backend keeps it quick; the graphs are dynamo's either way.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    cfg = TrainConfig(**RAMP)
    cfg.validate()
    assert build.dynamic_sides(cfg)
    model = build.compiled(cfg, build.build_model_for(cfg, devices.resolve_device("cpu"), classes=4))
    before = build.compiled_graphs()
    for side in (16, 16, 32, 32, 48, 48):  # two steps at each epoch's side
        model(torch.rand(2, 3, side, side)).sum().backward()
    model.eval()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(2, 3, 48, 48))
    assert build.compiled_graphs() - before == 4  # 16, 32, 48 in train mode, 48 in eval mode
