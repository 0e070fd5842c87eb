"""trainlib/build.py: the model a resolution schedule needs, and torch.compile's graphs under one."""
from __future__ import annotations

import functools

import torch

from trainlib import build, devices
from trainlib.config import TrainConfig
from trainlib.shape import run_shape

RAMP = dict(model="test_vit", img_size=48, min_res=16, start_ramp=0, end_ramp=2, epochs=3, device="cpu",
            backend="synthetic", num_classes=4)


def test_a_ramp_compiles_one_static_graph_per_side_and_mode(monkeypatch):
    # dynamo's own choice at a second shape would be one dynamic-shape graph that every later side reuses: 2 graphs
    # for the three train sides, not 3. The eager backend keeps it quick; the graphs are dynamo's either way.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    cfg = TrainConfig(**RAMP)
    cfg.validate()
    shape = run_shape(cfg)
    assert shape.dynamic
    model = build.compiled(build.build_model_for(cfg, devices.resolve_device("cpu"), 4, shape), shape)
    before = build.compiled_graphs()
    for side in (16, 16, 32, 32, 48, 48):  # two steps at each epoch's side
        model(torch.rand(2, 3, side, side)).sum().backward()
    model.eval()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(2, 3, 48, 48))
    assert build.compiled_graphs() - before == 4  # 16, 32, 48 in train mode, 48 in eval mode


def test_compile_names_the_devices_backend_and_leaves_torchs_default_alone(monkeypatch):
    """build_trainer passes Device.compile_backend() (TorchAir's on an NPU); without one torch.compile picks."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: seen.append(kw) or model)
    cfg = TrainConfig(model="test_vit", img_size=32, device="cpu", backend="synthetic", num_classes=4)
    cfg.validate()
    model = torch.nn.Linear(2, 2)
    npu_backend = object()
    assert build.compiled(model, run_shape(cfg), npu_backend) is model and seen[-1] == {"backend": npu_backend}
    build.compiled(model, run_shape(cfg))
    assert seen[-1] == {}
    ramp = TrainConfig(**RAMP)
    ramp.validate()
    build.compiled(model, run_shape(ramp), npu_backend)  # several sides: static graphs, with the backend all the same
    assert seen[-1] == {"dynamic": False, "backend": npu_backend}


def test_ddp_broadcasts_buffers_only_where_training_changes_them():
    """The ViT's buffers (--pixel-input's mean/std) are constants: no broadcast before each forward. A model with
    BatchNorm's running statistics keeps DDP's default. A one-rank gloo group on the CPU."""
    import socket
    import warnings

    import torch.distributed as dist

    cpu = devices.resolve_device("cpu")
    cfg = TrainConfig(model="test_vit", img_size=32, device="cpu", backend="synthetic", num_classes=4)
    cfg.validate()
    vit = build.build_model_for(cfg, cpu, 4, run_shape(cfg))
    assert [name for name, _ in vit.named_buffers()], "a ViT with pixel input has its mean/std buffers"
    with_bn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)  # the switch torch has, not its deprecated name
            assert build.data_parallel(vit, cpu).broadcast_buffers is False  # torch 2.13+: forward_sync_buffers
            assert build.data_parallel(with_bn, cpu).broadcast_buffers is True
    finally:
        dist.destroy_process_group()


def test_workers_default_to_the_backends_own_and_reach_the_loader_spec(monkeypatch):
    """--workers left out: 8 DALI threads (the H100's best feed, docs/benchmarks.md), 4 for the others; a given
    --workers is kept. The resolved value is in the config (config.json) and in each LoaderSpec."""
    from pipeline.backends import Backend
    from trainlib.config import parse_config
    from trainlib.distributed import Placement

    monkeypatch.setattr(Backend, "loader_class", lambda self: lambda spec: spec)  # the spec, not a loader
    cpu = devices.resolve_device("cpu")
    cases = [([], "dali", 8), (["--workers", "4"], "dali", 4), (["-j", "2"], "dali", 2), ([], "host", 4),
             ([], "hybrid", 4), (["--workers", "6"], "host", 6)]
    for flags, backend, want in cases:
        cfg = parse_config(["--data_path", "/no/such/shards", "--backend", backend, "--model", "test_vit",
                            "--img-size", "32", "--device", "cpu", *flags])
        assert cfg.to_dict()["workers"] == want, (flags, backend)
        train, val = build.build_loaders(cfg, cpu, Placement(0, 1, 0), 4, run_shape(cfg))
        assert (train.workers, val.workers) == (want, want), (flags, backend)
