"""pipeline/hybrid.py on the CPU (DALI's CPU operators): DALI and the host workers each make their share of the
batches, and together they yield exactly the host backend's samples, batch for batch, epoch after epoch."""
from __future__ import annotations

import json

import pytest
import torch

import train
from pipeline import build_loader
from pipeline.hybrid import HybridOptions
from pipeline.resolution import ResSchedule

pytest.importorskip("nvidia.dali")


def batches(path, split, backend, share=0.75, rank=0, world_size=1, epochs=(0,), batch_size=4, img_size=16,
            res_schedule=None):
    options = HybridOptions(dali_share=share) if backend == "hybrid" else None
    with build_loader(data_path=path, split=split, backend=backend, batch_size=batch_size, device="cpu", rank=rank,
                      world_size=world_size, workers=2, img_size=img_size, dtype=torch.uint8, options=options,
                      res_schedule=res_schedule) as loader:
        out = []
        for epoch in epochs:
            loader.set_epoch(epoch)
            out.append([(x.shape, y.tolist()) for x, y in loader])
        return out, loader


@pytest.mark.parametrize("split", ["train", "val"])
def test_hybrid_yields_the_host_backends_samples_in_order(sample_shards, split):
    for rank in range(2):
        hybrid, loader = batches(sample_shards, split, "hybrid", rank=rank, world_size=2, epochs=(0, 1, 2))
        host, _ = batches(sample_shards, split, "host", rank=rank, world_size=2, epochs=(0, 1, 2))
        assert hybrid == host
        assert len(loader.dali) == int(0.75 * len(loader)) and len(loader.dali) + len(loader.host) == len(loader)
        assert loader.dali.run.number == 1  # epochs followed on: one DALI pipeline for all three


def test_both_parts_follow_a_resolution_schedule(sample_shards):
    schedule = ResSchedule(16, 48, 0, 2, step=16)
    hybrid, loader = batches(sample_shards, "train", "hybrid", epochs=(0, 1, 2), img_size=48, res_schedule=schedule)
    host, _ = batches(sample_shards, "train", "host", epochs=(0, 1, 2), img_size=48, res_schedule=schedule)
    assert hybrid == host  # the same samples in the same batches, at each epoch's side
    assert [{shape[-1] for shape, _ in epoch} for epoch in hybrid] == [{16}, {32}, {48}]
    assert loader.dali.run.number == 1


def test_the_share_is_spread_and_checked(sample_shards):
    _, loader = batches(sample_shards, "train", "hybrid", share=0.5, batch_size=2)  # 24 batches
    assert loader.dali.batches_of(0) == list(range(1, 24, 2)) and loader.host.batches_of(0) == list(range(0, 24, 2))
    for share in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="dali_share must be between 0 and 1"):
            batches(sample_shards, "train", "hybrid", share=share)


def test_train_py_runs_the_hybrid_backend(sample_shards, tmp_path):
    out = tmp_path / "run"
    assert train.main(["--model", "test_vit", "--img-size", "32", "--device", "cpu", "--workers", "1",
                       "--data_path", str(sample_shards), "--backend", "hybrid", "--hybrid-dali-share", "0.6",
                       "--batch-size", "8", "--epochs", "2", "--output", str(out), "--no-plots"]) == 0
    env = json.loads((out / "env.json").read_text())
    assert env["train_loader"].startswith("hybrid: 3 of 6 batches an epoch by dali")
    assert json.loads((out / "summary.json").read_text())["global_step"] == 12


def test_a_share_that_leaves_a_decoder_nothing_is_refused(sample_shards):
    with pytest.raises(ValueError, match="leaves one decoder none of the 2 batches"):
        batches(sample_shards, "val", "hybrid", share=0.4, batch_size=8)  # 16 val samples: 2 batches, DALI 0


def test_a_state_goes_on_with_both_parts_where_the_host_backend_would(sample_shards):
    """A state taken mid-epoch on 2 ranks loads into one hybrid loader: the rest of the epoch is the host backend's
    rest, batch for batch (a short rest may leave a part none), and the epoch after it is whole."""
    def rest_of(backend, state):
        options = HybridOptions(dali_share=0.75) if backend == "hybrid" else None
        with build_loader(data_path=sample_shards, split="train", backend=backend, batch_size=4, device="cpu",
                          workers=2, img_size=16, dtype=torch.uint8, options=options) as loader:
            loader.load_state_dict(state)
            return [[y.tolist() for _, y in loader] for _ in range(2)]

    with build_loader(data_path=sample_shards, split="train", backend="host", batch_size=4, device="cpu",
                      world_size=2, workers=1, img_size=16, dtype=torch.uint8) as first:
        first.set_epoch(1)
        for _ in zip(range(3), first):
            pass
        state = first.state_dict()
    hybrid, host = rest_of("hybrid", state), rest_of("host", state)
    assert hybrid == host and len(hybrid[0]) == (48 - 24) // 4 and len(hybrid[1]) == 12
