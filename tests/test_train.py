"""train.py end to end on the CPU with timm's 300k-parameter `test_vit` at 32 px on the shared sample shards (4 classes,
48 train / 16 val): it learns, resumes exactly after a crash, writes checkpoints timm can load, runs under a
2-process torchrun like it runs alone, and fails cleanly on a missing device."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

import make_shards
import train
from pipeline.loader import LoaderSpec
from pipeline.shards.format import read_index, shard_list
from trainlib import checkpoint, devices
from trainlib.engine import Trainer
from trainlib.runlog import plot_metrics

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model", "test_vit", "--img-size", "32", "--device", "cpu", "--workers", "1", "--lr", "3e-3",
        "--warmup-epochs", "1"]


def metrics(output: Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ok(argv: list[str]) -> None:
    assert train.main(argv) == 0


def test_learns_far_above_chance(sample_shards, tmp_path, capsys):
    out = tmp_path / "run"
    run_ok([*TINY, "--data_path", str(sample_shards), "--batch-size", "8", "--epochs", "6", "--eval-freq", "3",
            "--output", str(out), "-p", "3"])
    evals = metrics(out, "eval")
    assert [e["samples"] for e in evals] == [16, 16]  # the whole val split, each sample once
    assert evals[-1]["acc1"] >= 62.5, evals  # 4 classes: chance is 25%
    text = capsys.readouterr().out
    assert " * Acc@1 " in text and "FPS@all " in text  # the lines ModelZoo scripts grep
    for name in ("config.json", "env.json", "summary.json", "plots.png", "last.pth", "best.pth"):
        assert (out / name).is_file(), name
    env = json.loads((out / "env.json").read_text())
    assert env["world_size"] == 1 and env["torch"] == torch.__version__


def crash_at_step(monkeypatch, n: int) -> None:
    """Make the n-th training step of this process raise, as a crash would."""
    real_step, calls = Trainer.step_on, []

    def step_on(self, batches):
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError(f"simulated crash at step {n}")
        return real_step(self, batches)
    monkeypatch.setattr(Trainer, "step_on", step_on)


def run_and_crash(common: list[str], tmp_path: Path, monkeypatch, crash_at: int, save_steps: int):
    """An uninterrupted run (ref) and the same run crashing in its step `crash_at`, checkpointing every
    `save_steps` (crashed); their folders."""
    ref, crashed = tmp_path / "ref", tmp_path / "crashed"
    run_ok([*common, "--output", str(ref)])
    with monkeypatch.context() as patch:
        crash_at_step(patch, crash_at)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train.main([*common, "--output", str(crashed), "--save-steps", str(save_steps)])
    return ref, crashed


def test_resume_after_crash_continues_exactly(sample_shards, tmp_path, monkeypatch):
    # drop path draws random numbers every step, so equal losses also prove the RNG streams were restored.
    common = [*TINY, "--data_path", str(sample_shards), "--batch-size", "8", "--epochs", "2", "--eval-freq", "0",
              "-p", "1", "--drop-path", "0.1"]
    # 6 steps per epoch: a checkpoint at global step 8 (epoch 1, step 2), then a crash after step 9.
    ref, crashed = run_and_crash(common, tmp_path, monkeypatch, crash_at=10, save_steps=4)
    state = checkpoint.load(crashed / "last.pth")
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 2, 8)
    run_ok([*common, "--output", str(crashed), "--resume", "auto"])

    expected = {r["global_step"]: r for r in metrics(ref, "train")}
    resumed = [r for r in metrics(crashed, "train")][-4:]  # after the resume: global steps 9..12
    assert [r["global_step"] for r in resumed] == [9, 10, 11, 12]
    for r in resumed:
        assert r["lr"] == expected[r["global_step"]]["lr"]
        assert r["loss"] == pytest.approx(expected[r["global_step"]]["loss"], rel=1e-5, abs=1e-6)
    assert (r["epoch"], r["step"]) == (1, 6)

    # Our checkpoint is what timm's own loader expects ("model" key, weights_only-safe contents).
    net = timm.create_model("test_vit", num_classes=4, img_size=32, checkpoint_path=str(crashed / "last.pth"))
    saved = checkpoint.load(crashed / "last.pth")["model"]
    assert all(torch.equal(v, saved[k]) for k, v in net.state_dict().items())


RAMP = ["--img-size", "48", "--min-res", "16", "--max-res", "48", "--start-ramp", "0", "--end-ramp", "2"]


def test_a_ramp_trains_each_epoch_at_its_side_and_resumes_exactly_across_a_change(sample_shards, tmp_path,
                                                                                 monkeypatch, capsys):
    """test_vit's patch is 16 px: epochs at 16, 32, 48 px, a checkpoint inside epoch 1 (32 px), a crash in it, and a
    resume that ends with the weights of the uninterrupted run; eval at the last side (48)."""
    common = [*TINY, *RAMP, "--data_path", str(sample_shards), "--batch-size", "8", "--epochs", "3",
              "--eval-freq", "1", "-p", "1", "--drop-path", "0.1", "--no-plots"]
    ref, crashed = run_and_crash(common, tmp_path, monkeypatch, crash_at=10, save_steps=4)
    assert [r["img_size"] for r in metrics(ref, "train")] == [16] * 6 + [32] * 6 + [48] * 6
    assert [r["img_size"] for r in metrics(ref, "eval")] == [48] * 3
    with Image.open(plot_metrics(ref)) as plots:  # a fourth panel: the side per step
        assert plots.size == (800, 1200)
    assert "Epoch [1] train images 32 px" in capsys.readouterr().out
    assert checkpoint.load(crashed / "last.pth")["global_step"] == 8  # epoch 1, step 2
    run_ok([*common, "--output", str(crashed), "--resume", "auto"])
    ours, theirs = checkpoint.load(crashed / "last.pth"), checkpoint.load(ref / "last.pth")
    assert ours["global_step"] == theirs["global_step"] == 18
    for name, weight in theirs["model"].items():
        assert torch.allclose(ours["model"][name], weight, rtol=0, atol=1e-6), name
    assert metrics(crashed, "eval")[-1]["acc1"] == metrics(ref, "eval")[-1]["acc1"]


@pytest.mark.parametrize("argv, message", [
    (["--min-res", "16"], "--min-res 16: give --end-ramp"),
    (["--end-ramp", "3"], "--max-res, --start-ramp and --end-ramp shape a schedule that --min-res starts"),
    ([*RAMP[:2], "--min-res", "24", "--end-ramp", "2"], "--min-res 24 is not a multiple of 16 (the patch size)"),
    (["--eval-img-size", "40"], "--eval-img-size 40 is not a multiple of test_vit's patch size 16"),
])
def test_a_schedule_that_cannot_work_is_a_usage_error_naming_the_flag(sample_shards, tmp_path, capsys, argv,
                                                                       message):
    """Flag by flag (the parser's usage, then its line), or against the model's patch (one line): exit 2 either
    way, and no run folder."""
    try:
        status = train.main([*TINY, "--data_path", str(sample_shards), "--batch-size", "8", "--epochs", "3",
                             "--output", str(tmp_path / "run"), *argv])
    except SystemExit as e:
        status = e.code
    err = capsys.readouterr().err.strip()
    assert status == 2 and message in err.splitlines()[-1] and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_evaluate_only_reproduces_best(sample_shards, tmp_path, capsys):
    out = tmp_path / "run"
    run_ok([*TINY, "--data_path", str(sample_shards), "--batch-size", "8", "--epochs", "2", "--output", str(out)])
    best = json.loads((out / "summary.json").read_text())["best_acc1"]
    capsys.readouterr()
    run_ok([*TINY, "--data_path", str(sample_shards), "--evaluate", "--pretrained", str(out / "best.pth"),
            "--output", str(tmp_path / "eval"), "--val-batch-size", "5"])  # another batch: padding must not count
    assert f" * Acc@1 {best:.3f} " in capsys.readouterr().out


def test_two_ranks_see_the_same_samples_as_one(sample_shards, tmp_path):
    args = [*TINY, "--data_path", str(sample_shards), "--epochs", "1", "-p", "2", "--no-save-checkpoints"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    one, two = tmp_path / "one", tmp_path / "two"
    run_ok([*args, "--batch-size", "8", "--output", str(one)])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train.py"), *args, "--batch-size", "4", "--output", str(two)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(" * Acc@1 ") == 1  # only rank 0 speaks
    # The seed's launcher: --batch-size is per node there, split over the processes it spawns.
    spawned = tmp_path / "spawned"
    cmd = [sys.executable, str(ROOT / "train.py"), *args, "--multiprocessing-distributed", "--nproc-per-node", "2",
           "--batch-size", "8", "--dist-url", f"tcp://127.0.0.1:{free_port()}", "--output", str(spawned)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for out, world, batch in ((one, 1, 8), (two, 2, 4), (spawned, 2, 4)):
        summary = json.loads((out / "summary.json").read_text())
        assert summary["global_step"] * world * batch == 48  # every train sample once
        assert metrics(out, "eval")[-1]["samples"] == 16  # every val sample once, across ranks
        assert json.loads((out / "env.json").read_text())["world_size"] == world


def test_synthetic_perf_run_stops_at_max_steps(tmp_path, capsys):
    out = tmp_path / "perf"
    run_ok([*TINY, "--backend", "synthetic", "--num-classes", "10", "--batch-size", "4", "--max-steps", "5",
            "--warmup-log-steps", "2", "--eval-freq", "0", "--output", str(out), "-p", "1"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 5 and summary["fps"] > 0
    state = checkpoint.load(out / "last.pth")
    assert state["epoch"] == 0 and state["step_in_epoch"] == 5  # resumable mid-epoch
    assert "FPS@all " in capsys.readouterr().out


def test_resume_under_another_precision(tmp_path):
    # fp32 leaves an empty loss-scaler state; an fp16 resume must start its own scale instead of failing on it.
    out = tmp_path / "run"
    common = [*TINY, "--backend", "synthetic", "--num-classes", "10", "--batch-size", "4", "--eval-freq", "0",
              "--output", str(out), "--no-plots"]
    run_ok([*common, "--max-steps", "2", "--amp", "fp32"])
    run_ok([*common, "--max-steps", "4", "--amp", "fp16", "--resume", "auto"])
    assert checkpoint.load(out / "last.pth")["global_step"] == 4


def test_a_resume_file_that_is_no_checkpoint_fails_in_one_line(tmp_path, capsys):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    assert train.main([*TINY, "--backend", "synthetic", "--num-classes", "10", "--batch-size", "4",
                       "--output", str(tmp_path / "o"), "--resume", str(junk)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "junk.pth: not a readable checkpoint" in err
    assert not (tmp_path / "o").exists()  # a failed start leaves no run behind for --resume auto to find


@pytest.mark.parametrize("flag, make", [
    ("--resume", "another model's checkpoint"),
    ("--pretrained", "junk"), ("--pretrained", "json"), ("--pretrained", "a tensor"),
    ("--pretrained", "another model's checkpoint"),
])
def test_a_resume_or_pretrained_file_that_does_not_fit_leaves_no_run_folder(tmp_path, capsys, flag, make):
    synthetic = [*TINY, "--backend", "synthetic", "--num-classes", "10", "--batch-size", "4", "--eval-freq", "0",
                 "--no-plots"]
    path = tmp_path / "file.pth"
    if make == "another model's checkpoint":
        run_ok([*synthetic, "--max-steps", "1", "--output", str(tmp_path / "other"), "--model", "vit_tiny_patch16_224"])
        path = tmp_path / "other" / "last.pth"
    elif make == "a tensor":
        torch.save(torch.ones(3), path)
    else:
        path.write_text("{}" if make == "json" else "not weights")
    capsys.readouterr()
    assert train.main([*synthetic, flag, str(path), "--output", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("train.py: error: ")
    assert not (tmp_path / "o").exists()


def test_a_batch_larger_than_the_data_is_a_usage_error(sample_shards, tmp_path, capsys):
    out = tmp_path / "o"
    assert train.main([*TINY, "--data_path", str(sample_shards), "--batch-size", "64", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "48 train samples cannot fill one batch of 64" in err and not out.exists()


def test_a_bad_data_path_leaves_no_run_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert train.main([*TINY, "--data_path", str(tmp_path / "empty"), "--output", str(tmp_path / "o")]) == 1
    assert "no shard manifest here" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_a_run_inside_its_warm_up_prints_a_numeric_fps(tmp_path, capsys):
    out = tmp_path / "short"
    run_ok([*TINY, "--backend", "synthetic", "--num-classes", "10", "--batch-size", "4", "--max-steps", "3",
            "--warmup-log-steps", "10", "--eval-freq", "0", "--output", str(out), "-p", "1", "--no-plots"])
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("FPS@all")][-1]
    fps = float(line.split()[1])
    assert fps > 0 and line.endswith("(3 steps, inside the 10-step warm-up)")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["fps"] == pytest.approx(fps, rel=1e-3) and summary["fps_scope"] == "all steps, inside warm-up"


def test_a_finished_run_resumed_prints_its_final_figures_again(sample_shards, tmp_path, capsys):
    common = [*TINY, "--data_path", str(sample_shards), "--batch-size", "8", "--epochs", "2", "--no-plots",
              "--output", str(tmp_path / "run"), "--resume", "auto"]  # 12 steps: past the 10-step warm-up
    run_ok(common)
    first = capsys.readouterr().out.splitlines()
    figures = [line for line in first if line.startswith((" * Acc@1", "FPS@all"))][-2:]
    assert len(figures) == 2 and figures[0].startswith(" * Acc@1")
    run_ok(common)
    again = capsys.readouterr().out.splitlines()
    assert any(line.startswith("nothing to train") for line in again) and again[-2:] == figures


def test_epochs_extend_a_finished_run_and_never_cut_below_its_position(tmp_path, capsys):
    out = tmp_path / "run"
    common = [*TINY, "--backend", "synthetic", "--num-classes", "10", "--batch-size", "4", "--eval-freq", "0",
              "--output", str(out), "--no-plots", "--steps-per-epoch", "3", "-p", "1", "--resume", "auto"]
    run_ok([*common, "--epochs", "2"])
    assert checkpoint.load(out / "last.pth")["global_step"] == 6
    capsys.readouterr()
    run_ok([*common, "--epochs", "3"])  # the most common resume: train a finished run for longer
    assert "note: the LR schedule is recomputed for 3 epochs of 3 steps (the checkpoint's: 2 of 3)" in \
        capsys.readouterr().out
    rows = metrics(out, "train")
    assert [r["global_step"] for r in rows[-3:]] == [7, 8, 9] and checkpoint.load(out / "last.pth")["epoch"] == 3
    # The LR the extended run used at each step is the 3-epoch schedule's, as a fresh 3-epoch run would use.
    fresh = tmp_path / "fresh"
    run_ok([*common[:-2], "--epochs", "3", "--output", str(fresh)])  # no --resume; the later --output wins
    assert [r["lr"] for r in rows[-3:]] == pytest.approx([r["lr"] for r in metrics(fresh, "train")[-3:]])
    before = (out / "metrics.jsonl").read_text(), (out / "config.json").read_text()
    assert train.main([*common, "--epochs", "1"]) == 1  # 3 steps: below the checkpoint's 9
    assert "--epochs 1 ends before the checkpoint's position (epoch 3, step 0, global step 9" in capsys.readouterr().err
    assert ((out / "metrics.jsonl").read_text(), (out / "config.json").read_text()) == before  # the run untouched


@pytest.mark.parametrize("argv, message", [
    (["--img-size", "30"], "not a multiple of"),
    (["--pretrained", "missing.pth"], "no such checkpoint file"),
])
def test_model_mistakes_fail_in_one_line(tmp_path, capsys, argv, message):
    base = [*TINY, "--backend", "synthetic", "--num-classes", "10", "--batch-size", "4", "--eval-freq", "0",
            "--output", str(tmp_path / "o"), "--max-steps", "1"]
    assert train.main([*base, *argv]) in (1, 2)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "o").exists()


def test_npu_without_torch_npu_fails_in_one_line():
    if importlib.util.find_spec("torch_npu") is not None:
        pytest.skip("torch_npu is installed here")
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--device", "npu", "--backend", "synthetic"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "torch_npu" in proc.stderr, proc.stderr


def test_compile_without_the_devices_backend_fails_in_one_line_before_any_file(tmp_path, capsys, monkeypatch):
    """--compile where the device's backend cannot load (an NPU without TorchAir, trainlib.devices.compile_backend:
    its own test in tests/test_devices.py): one line, exit 2, no run folder."""
    def missing(kind):
        raise devices.DeviceError(f"--compile on {kind} needs TorchAir (a stand-in for the real check)")

    monkeypatch.setattr(devices, "compile_backend", missing)
    argv = [*TINY, "--backend", "synthetic", "--num-classes", "10", "--batch-size", "4", "--eval-freq", "0",
            "--output", str(tmp_path / "o"), "--max-steps", "1", "--compile"]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--compile on cpu needs TorchAir" in err, err
    assert not (tmp_path / "o").exists()


def test_missing_devices_raise_clear_errors():
    if not torch.cuda.is_available():
        with pytest.raises(devices.DeviceError, match="no CUDA GPU"):
            devices.resolve_device("gpu")
    cpu = devices.resolve_device("cpu")
    assert cpu.dist_backend == "gloo" and cpu.peak_flops(torch.bfloat16) is None
    with cpu.autocast(torch.float32):
        pass  # fp32: a do-nothing context


def test_fp8_trains_through_fp8_matmuls(sample_shards, tmp_path, monkeypatch):
    from model import fp8
    calls = []
    real = fp8._Float8Matmul.forward
    monkeypatch.setattr(fp8._Float8Matmul, "forward", staticmethod(lambda *a: calls.append(1) or real(*a)))
    out = tmp_path / "run"
    run_ok([*TINY, "--data_path", str(sample_shards), "--batch-size", "16", "--epochs", "6", "--eval-freq", "6",
            "--fp8", "--amp", "bf16", "--output", str(out), "--no-plots"])
    assert calls  # 16 images x 5 tokens: 16-aligned, so the FP8 path ran rather than the fallback
    assert metrics(out, "eval")[-1]["acc1"] >= 50.0  # 4 classes: chance is 25%


def test_dali_trains_under_a_ramp_and_its_options_reach_the_loader(sample_shards, tmp_path):
    pytest.importorskip("nvidia.dali")
    out = tmp_path / "dali"
    run_ok([*TINY, *RAMP, "--data_path", str(sample_shards), "--backend", "dali", "--batch-size", "8", "--epochs", "3",
            "--eval-freq", "3", "--output", str(out), "--no-plots", "-p", "2", "--dali-readers", "1"])
    assert [r["img_size"] for r in metrics(out, "train")] == [16] * 3 + [32] * 3 + [48] * 3  # every 2nd step
    assert metrics(out, "eval")[-1]["samples"] == 16 and metrics(out, "eval")[-1]["img_size"] == 48
    env = json.loads((out / "env.json").read_text())
    assert "1 reader processes" in env["train_loader"] and "1 reader processes" in env["val_loader"]


def test_skipped_samples_are_reported_per_epoch_and_in_the_summary(sample_shards, tmp_path, capsys):
    data = tmp_path / "shards"
    shutil.copytree(sample_shards, data)
    shard = shard_list(data, "train")[1]
    os.truncate(shard.path, Path(shard.path).stat().st_size * 2 // 3)
    cut = shard.num_samples  # a shard of another size than the manifest's: every sample of it skipped, none read
    out = tmp_path / "run"
    run_ok([*TINY, "--data_path", str(data), "--batch-size", "8", "--epochs", "2", "--eval-freq", "0",
            "--on-error", "skip", "--output", str(out), "--no-plots"])
    lines = [x for x in capsys.readouterr().out.splitlines() if "undecodable" in x]
    assert lines == [f"Epoch [{e}] train: skipped {cut} undecodable samples (--on-error skip) from "
                     f"train-000001.tar x{cut}" for e in (0, 1)] and cut > 0
    assert [(r["epoch"], r["samples"]) for r in metrics(out, "skipped")] == [(0, cut), (1, cut)]
    assert json.loads((out / "summary.json").read_text())["skipped_samples"] == 2 * cut


def test_tensorboard_gets_the_figures_of_metrics_jsonl(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    out = tmp_path / "run"
    run_ok([*TINY, "--backend", "synthetic", "--num-classes", "10", "--batch-size", "4", "--max-steps", "6",
            "--eval-freq", "0", "--output", str(out), "-p", "2", "--no-plots", "--tensorboard"])
    events = event_accumulator.EventAccumulator(str(out / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/img_s", "train/input_wait", "summary/fps"} <= set(tags)
    losses = [(e.step, e.value) for e in events.Scalars("train/loss")]
    expected = [(r["global_step"], r["loss"]) for r in metrics(out, "train")]
    assert [s for s, _ in losses] == [s for s, _ in expected] == [2, 4, 6]
    assert [v for _, v in losses] == pytest.approx([v for _, v in expected], rel=1e-6)


def test_tensorboard_without_the_package_is_one_line(tmp_path, monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard"
                        else real_find_spec(name, *a))
    with pytest.raises(SystemExit) as e:
        train.main([*TINY, "--backend", "synthetic", "--tensorboard", "--output", str(tmp_path / "o")])
    assert e.value.code == 2 and "needs the tensorboard package" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_divergence_stops_the_run_and_never_reaches_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    common = [*TINY, "--backend", "synthetic", "--num-classes", "10", "--batch-size", "4", "--eval-freq", "0",
              "--output", str(out), "--no-plots", "--save-steps", "1", "-p", "100"]
    assert train.main([*common, "--lr", "1e6", "--max-steps", "40", "--clip-grad", "0", "--warmup-epochs", "0"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the training loss became non-finite" in err, err
    if (out / "last.pth").exists():  # the steps before the loss broke may have been saved: all of them finite
        state = checkpoint.load(out / "last.pth")
        assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert not (out / "summary.json").exists()


def test_a_full_disk_is_one_line_and_stale_temporary_files_go(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    stale = out / ".last.pth.999999999.tmp"  # as a process killed while saving leaves it (no such pid)
    writer = subprocess.Popen(["sleep", "60"])  # a writer that still runs: its file is not ours to remove
    live = out / f".last.pth.{writer.pid}.tmp"
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(out)], capture_output=True).returncode:
        writer.kill()
        pytest.skip("mounting a small tmpfs needs root")
    try:
        (out / stale.name).write_bytes(b"half a checkpoint")
        (out / live.name).write_bytes(b"being written")
        assert train.main([*TINY, "--backend", "synthetic", "--num-classes", "10", "--batch-size", "4",
                           "--eval-freq", "0", "--output", str(out), "--no-plots", "--max-steps", "2",
                           "--model", "vit_tiny_patch16_224"]) == 1
        captured = capsys.readouterr()
        assert f"removed {out / stale.name}" in captured.out and (out / live.name).exists()
        assert captured.err.count("\n") == 1 and "last.pth: no space left on device (" in captured.err, captured.err
        assert "MiB free there, the checkpoint needs about" in captured.err
        assert not [p for p in out.iterdir() if p.name.startswith(".last.pth.") and p.name != live.name]
    finally:
        writer.kill()
        subprocess.run(["umount", str(out)], check=True)


def test_a_rank_that_never_comes_is_an_error_not_a_hang(tmp_path):
    # Rank 0 of 2 alone: joining the group must give up after --dist-timeout, in one line, instead of waiting forever.
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY, "--backend", "synthetic", "--num-classes", "10",
           "--world-size", "2", "--rank", "0", "--dist-url", f"tcp://127.0.0.1:{free_port()}", "--dist-timeout", "5",
           "--output", str(tmp_path / "o")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().count("\n") == 0 and "could not join the process group" in proc.stderr
    assert "within 5 s" in proc.stderr and not (tmp_path / "o").exists()


def test_a_rank_that_starts_before_the_store_host_waits_for_it(tmp_path):
    # Rank 1 first: its connection to rank 0's store is refused until rank 0 comes up; both must then train.
    args = [sys.executable, str(ROOT / "train.py"), *TINY, "--backend", "synthetic", "--num-classes", "10",
            "--world-size", "2", "--dist-url", f"tcp://127.0.0.1:{free_port()}", "--dist-timeout", "60",
            "--steps-per-epoch", "2", "--epochs", "1", "--eval-freq", "0", "--no-plots", "--no-save-checkpoints"]
    late = subprocess.Popen([*args, "--rank", "1", "--output", str(tmp_path / "o1")], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(3)
    first = subprocess.run([*args, "--rank", "0", "--output", str(tmp_path / "o0")], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    _, err = late.communicate(timeout=60)
    assert first.returncode == 0 and late.returncode == 0, first.stderr[-2000:] + err[-2000:]
    assert "summary: 2 steps" in first.stdout


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, train.EXIT_PREEMPTED), (signal.SIGINT, 130)])
def test_a_stop_signal_checkpoints_the_exact_step_and_resume_continues_there(tmp_path, sig, status):
    out = tmp_path / "run"
    cmd = [sys.executable, "-u", str(ROOT / "train.py"), *TINY, "--backend", "synthetic", "--num-classes", "10",
           "--batch-size", "4", "--eval-freq", "0", "--output", str(out), "--no-plots", "-p", "1",
           "--max-steps", "100000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait until it trains, then preempt it as Slurm or Kubernetes would
        if line.startswith("Epoch [0][20/"):
            proc.send_signal(sig)
            break
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err[-2000:]
    # SIGINT (Ctrl-C) also says, at once, that a second one stops without a checkpoint.
    assert time.monotonic() - t0 < 30 and err.strip().count("\n") == (sig == signal.SIGINT)
    assert f"stopped by {sig.name} at global step" in err
    step = int(err.split("global step ")[1].split()[0])
    state = checkpoint.load(out / "last.pth")
    assert state["global_step"] == step >= 20 and state["step_in_epoch"] == step
    rows = metrics(out, "train")
    assert rows[-1]["global_step"] == step  # -p 1: every step logged, the last one is the checkpoint's
    run_ok([*cmd[3:], "--resume", "auto", "--max-steps", str(step + 3)])
    resumed = metrics(out, "train")[-3:]
    assert [r["global_step"] for r in resumed] == [step + 1, step + 2, step + 3]


@pytest.fixture(scope="module")
def long_val_shards(tmp_path_factory):
    """48 train and 1,000 val images: an evaluation that lasts long enough to be interrupted."""
    root = tmp_path_factory.mktemp("long-val")
    for cmd in (["make_sample_data.py", str(root / "folder"), "--classes", "4", "--train-per-class", "12",
                 "--val-per-class", "250", "--min-side", "40", "--max-side", "64"],
                ["make_shards.py", "--data_path", str(root / "folder"), "--out", str(root / "shards"),
                 "--samples-per-shard", "100", "--workers", "2"]):
        subprocess.run([sys.executable, str(ROOT / "tools" / cmd[0]), *cmd[1:]], check=True, capture_output=True)
    return root / "shards"


@pytest.mark.parametrize("backend", ["host", "dali"])
def test_a_sigterm_to_the_process_group_while_it_evaluates_checkpoints(long_val_shards, tmp_path, backend):
    """What Slurm and Kubernetes do: SIGTERM to every process of the job, decode workers included, here while it
    evaluates. The workers leave it to the trainer, which finishes the evaluation, stops at the next step with a
    checkpoint and exits 143."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    out = tmp_path / "run"
    cmd = [sys.executable, "-u", str(ROOT / "train.py"), *TINY, "--data_path", str(long_val_shards), "--backend",
           backend, "--workers", "2", "--batch-size", "8", "--val-batch-size", "2", "--epochs", "3", "--output",
           str(out), "--no-plots", "-p", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a job's
    for line in proc.stdout:
        if line.startswith("Epoch [0][6/6]"):  # the epoch's last step: evaluation comes next
            time.sleep(0.5)  # into it: 500 batches of 2 took 1.7 s on a quiet 2-core machine (125 of 8: 0.5 s)
            signalled = time.time()
            os.killpg(proc.pid, signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == train.EXIT_PREEMPTED, err[-2000:]
    assert "stopped by SIGTERM at global step" in err and err.strip().count("\n") == 0, err[-2000:]
    assert checkpoint.load(out / "last.pth")["global_step"] >= 6
    evals = metrics(out, "eval")
    assert [r["epoch"] for r in evals] == [0] and evals[0]["time"] > signalled  # the evaluation it was in finished


def test_an_elastic_resume_trains_the_rest_of_the_epoch_on_another_layout(sample_shards, tmp_path, capsys):
    # 48 train samples. 1 rank x 8 stops after 2 steps (16 samples); 2 ranks x 4 (the same global batch) go on with
    # the 32 left, 4 steps, and stop after 2; 1 rank x 4 (another global batch) trains the last 16 in 4 steps.
    out, ref = tmp_path / "run", tmp_path / "ref"
    common = [*TINY, "--data_path", str(sample_shards), "--epochs", "2", "--eval-freq", "0", "-p", "1", "--no-plots"]
    run_ok([*common, "--batch-size", "8", "--output", str(ref)])
    run_ok([*common, "--batch-size", "8", "--output", str(out), "--max-steps", "2"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
           *common, "--batch-size", "4", "--output", str(out), "--resume", "auto", "--max-steps", "4"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "epoch 0 goes on with the 4 steps of samples it has not trained on" in proc.stdout
    state = checkpoint.load(out / "last.pth")
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (0, 2, 4)
    assert state["loader"]["stages"] == [[1, 8, 2]] and state["world_size"] == 2
    # The same global batch: the schedule is the uninterrupted run's, step for step.
    lrs = {r["global_step"]: r["lr"] for r in metrics(ref, "train")}
    assert [(r["global_step"], r["lr"]) for r in metrics(out, "train")[-2:]] == [(3, lrs[3]), (4, lrs[4])]

    capsys.readouterr()
    run_ok([*common, "--batch-size", "4", "--output", str(out), "--resume", "auto"])
    text = capsys.readouterr().out
    assert "epoch 0 goes on with the 4 steps of samples it has not trained on" in text
    assert "the LR schedule is recomputed for 2 epochs of 12 steps (the checkpoint's: 2 of 6); at step 8" in text
    rows = metrics(out, "train")[-16:]
    assert [(r["epoch"], r["step"]) for r in rows[:4]] == [(0, 1), (0, 2), (0, 3), (0, 4)]  # the rest: 16 samples
    assert [(r["epoch"], r["step"]) for r in rows[4:]] == [(1, s) for s in range(1, 13)]  # then whole epochs of 4
    assert [r["global_step"] for r in rows] == list(range(9, 25))  # the schedule ends with the run
    # From there the LR is the schedule a fresh run on this layout follows, step for step.
    run_ok([*common, "--batch-size", "4", "--output", str(tmp_path / "fresh")])
    fresh = {r["global_step"]: r["lr"] for r in metrics(tmp_path / "fresh", "train")}
    assert [r["lr"] for r in rows] == pytest.approx([fresh[r["global_step"]] for r in rows])
    state = checkpoint.load(out / "last.pth")
    assert (state["epoch"], state["step_in_epoch"], state["loader"]["stages"]) == (2, 0, [])


def test_an_elastic_resume_inside_a_ramp_goes_on_at_the_epochs_side(sample_shards, tmp_path, capsys):
    # 1 rank x 8 stops inside epoch 1 (32 px) after 2 of its 6 steps; 1 rank x 4 trains its other 32 samples at
    # 32 px in 8 steps, then epoch 2 at 48 px
    out = tmp_path / "run"
    common = [*TINY, *RAMP, "--data_path", str(sample_shards), "--epochs", "3", "--eval-freq", "0", "-p", "1",
              "--no-plots", "--output", str(out)]
    run_ok([*common, "--batch-size", "8", "--max-steps", "8"])
    capsys.readouterr()
    run_ok([*common, "--batch-size", "4", "--resume", "auto"])
    assert "epoch 1 goes on with the 8 steps of samples it has not trained on" in capsys.readouterr().out
    rows = metrics(out, "train")[8:]
    assert [(r["epoch"], r["img_size"]) for r in rows] == [(1, 32)] * 8 + [(2, 48)] * 12
    assert [r["global_step"] for r in rows] == list(range(17, 37))  # the 64 samples trained: 16 steps of 4


def test_an_elastic_resume_needs_the_same_data(sample_shards, tmp_path, capsys):
    out = tmp_path / "run"
    common = [*TINY, "--data_path", str(sample_shards), "--epochs", "2", "--eval-freq", "0", "--output", str(out)]
    run_ok([*common, "--batch-size", "8", "--max-steps", "2"])
    state = checkpoint.load(out / "last.pth")
    checkpoint.save(out / "last.pth", {**state, "loader": {**state["loader"], "samples": 47}})
    assert train.main([*common, "--batch-size", "4", "--resume", "auto"]) == 1
    assert "taken on 47 samples, this loader's split has 48; the rest of an epoch continues only the plan" in \
        capsys.readouterr().err
    assert train.main([*common, "--batch-size", "8", "--resume", "auto"]) == 1  # its own layout: the same rule


def test_a_shard_swapped_after_a_checkpoint_is_refused_at_the_resume(sample_folder, sample_shards, tmp_path, capsys):
    data, other, out = tmp_path / "data", tmp_path / "other", tmp_path / "run"
    shutil.copytree(sample_shards, data)
    assert make_shards.main(["--data_path", str(sample_folder), "--out", str(other), "--samples-per-shard", "10",
                             "--seed", "1"]) == 0
    common = [*TINY, "--data_path", str(data), "--batch-size", "8", "--eval-freq", "0", "--output", str(out)]
    run_ok([*common, "--epochs", "2", "--max-steps", "3"])
    # Another set's shard of the same sample count, its index with it: only its size tells it apart.
    assert len(read_index(other / "train-000001.idx")) == len(read_index(data / "train-000001.idx")) == 10
    for name in ("train-000001.tar", "train-000001.idx"):
        shutil.copy(other / name, data / name)
    capsys.readouterr()
    assert train.main([*common, "--epochs", "2", "--resume", "auto"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train-000001.tar: " in err and "not the shard this set was made with" in err
    assert checkpoint.load(out / "last.pth")["global_step"] == 3  # nothing trained on it


def change_a_byte(path: Path, at: int = 2000) -> None:
    """Other bytes at the same size: a shard no size check tells from the manifest's (a byte of an image)."""
    blob = bytearray(path.read_bytes())
    blob[at] ^= 0xFF
    path.write_bytes(bytes(blob))


def test_a_same_size_change_after_a_checkpoint_is_refused_or_skipped_at_the_resume(sample_shards, tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "run"
    shutil.copytree(sample_shards, data)
    common = [*TINY, "--data_path", str(data), "--batch-size", "8", "--eval-freq", "0", "--output", str(out),
              "--no-plots"]
    run_ok([*common, "--epochs", "2", "--max-steps", "3"])
    assert "shard contents: 5 shard(s) read and hashed" in capsys.readouterr().out
    change_a_byte(data / "train-000001.tar")
    assert train.main([*common, "--epochs", "2", "--resume", "auto"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{data / 'train-000001.tar'}: its sha256 is " in err, err
    assert checkpoint.load(out / "last.pth")["global_step"] == 3  # nothing trained on it
    run_ok([*common, "--epochs", "2", "--resume", "auto", "--on-error", "skip"])
    text = capsys.readouterr().out
    assert "shard contents: 1 shard(s) read and hashed" in text and ", 4 verified before" in text
    assert "shard contents: train-000001.tar: its sha256 is " in text and "its samples are skipped" in text
    # The rest of epoch 0 (the loader starts at its 4th batch: the first 3 trained before the change, and are not
    # read again), then the whole of epoch 1.
    planner = LoaderSpec(str(data), "train", 8, torch.device("cpu")).planner(shard_list(data, "train"))
    rest = sum(ref is not None and ref[0].path.endswith("train-000001.tar")
               for step in range(3, 6) for ref in planner.batch(0, step))
    assert 0 < rest < 10 and [r["samples"] for r in metrics(out, "skipped")] == [rest, 10]


def test_a_wrong_sha256_in_the_manifest_stops_the_start_in_one_line(sample_shards, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(sample_shards, data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["splits"]["val"]["shards"][1]["sha256"] = "ab" * 32
    (data / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "run"
    assert train.main([*TINY, "--data_path", str(data), "--batch-size", "8", "--epochs", "1", "--output", str(out),
                       "--no-plots"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"train.py: error: {data / 'val-000001.tar'}: its sha256 is "
                   f"{hashlib.sha256((data / 'val-000001.tar').read_bytes()).hexdigest()[:16]}..., the manifest says "
                   f"abababababababab...: not the shard this set was made with (replaced, changed, or a manifest "
                   f"edited); restore it or remake the set")
    assert not out.exists()  # a failed start leaves no run folder


def test_check_shards_sizes_trains_on_a_same_size_change(sample_shards, tmp_path, capsys):
    """What --check-shards sizes gives up (docs/data.md): a shard of the right size is read as it is."""
    data = tmp_path / "data"
    shutil.copytree(sample_shards, data)
    change_a_byte(data / "train-000001.tar", at=40)  # in a tar header's name: the index still finds the bytes
    run_ok([*TINY, "--data_path", str(data), "--batch-size", "8", "--epochs", "1", "--eval-freq", "0",
            "--output", str(tmp_path / "run"), "--no-plots", "--check-shards", "sizes"])
    assert "shard contents" not in capsys.readouterr().out


def test_two_ranks_split_the_contents_check_and_both_refuse_what_either_found(sample_shards, tmp_path):
    """Rank 1 reads train-000001 (every other shard from the second): rank 0 learns of it through the gather and
    prints the one line; rank 1 is quiet."""
    data = tmp_path / "data"
    shutil.copytree(sample_shards, data)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
           *TINY, "--data_path", str(data), "--batch-size", "4", "--epochs", "1", "--eval-freq", "1", "--no-plots",
           "--output", str(tmp_path / "run")]
    ok = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert ok.stdout.count("shard contents: 7 shard(s) read and hashed") == 1  # train and val, rank 0's line
    change_a_byte(data / "train-000001.tar")
    bad = subprocess.run([*cmd, "--resume", "auto"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    ours = [line for line in bad.stderr.splitlines() if line.startswith("train.py:")]
    assert bad.returncode != 0 and len(ours) == 1, bad.stderr[-3000:]
    assert ours[0].startswith(f"train.py: error: {data / 'train-000001.tar'}: its sha256 is ")


def test_a_kill_9_leaves_no_temp_folder_past_the_next_start(sample_shards, tmp_path):
    """multiprocessing's `pymp-*` folder (the forkserver's socket) outlives a kill -9 of its process; the next start
    removes it, and neither a live run's folder nor another program's."""
    tmp = tmp_path / "tmp"
    (tmp / "pymp-another-program").mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp)}
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY, "--data_path", str(sample_shards), "--batch-size", "4",
           "--eval-freq", "0", "-p", "1", "--no-plots"]
    proc = subprocess.Popen([*cmd, "--epochs", "50", "--output", str(tmp_path / "killed")], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("Epoch [0][2/"):
                break
        marked = [mark.parent for mark in tmp.glob("pymp-*/vitpipe.owner")]
        assert len(marked) == 1, list(tmp.iterdir())
        short = [*cmd, "--epochs", "1", "--max-steps", "2"]
        assert subprocess.run([*short, "--output", str(tmp_path / "beside")], env=env, cwd=ROOT,
                              capture_output=True, timeout=120).returncode == 0
        assert marked[0].is_dir()  # its owner lives
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert marked[0].is_dir()  # what the kill left
    assert subprocess.run([*short, "--output", str(tmp_path / "after")], env=env, cwd=ROOT, capture_output=True,
                          timeout=120).returncode == 0
    assert not marked[0].exists() and (tmp / "pymp-another-program").is_dir()
    assert not list(tmp.glob("pymp-*/vitpipe.owner"))  # the runs that ended removed their own


def rank_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of train.py rank `rank` under the torchrun `launcher_pid` (not its loader workers, which share its
    environment, nor a rank of another job on the same machine)."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if (proc.name.isdigit() and int(proc.name) != launcher_pid and any(a.endswith(b"train.py") for a in cmdline)
                and f"RANK={rank}".encode() in environ and b"TORCHELASTIC_RUN_ID" in b" ".join(environ)
                and descends_from(int(proc.name), launcher_pid)):
            return int(proc.name)
    return None


def descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        try:
            pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])  # the ppid
        except (OSError, ValueError, IndexError):
            return False
        if pid == ancestor:
            return True
    return False


def test_a_sigterm_to_torchrun_checkpoints_once_and_our_code_adds_no_traceback(sample_shards, tmp_path):
    """torchrun passes a SIGTERM on to its ranks; they stop at one step with one checkpoint and one line (rank 0's).
    torchrun itself then exits 1 with its own SignalException traceback (its code, not ours: docs/training.md)."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
           *TINY, "--data_path", str(sample_shards), "--batch-size", "4", "--epochs", "50", "--eval-freq", "0",
           "-p", "1", "--no-plots", "--output", str(out)]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("Epoch [0][3/"):
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=120)
    ours = [line for line in err.splitlines() if line.startswith("train.py:")]
    assert len(ours) == 1 and "stopped by SIGTERM at global step" in ours[0], err[-3000:]
    step = int(ours[0].split("global step ")[1].split()[0])
    assert checkpoint.load(out / "last.pth")["global_step"] == step
    frames = [line for line in err.splitlines() if line.strip().startswith("File ")]
    assert not [f for f in frames if str(ROOT) in f and ".venv" not in f and "site-packages" not in f], err[-3000:]


def test_a_silent_peer_is_one_line_naming_the_collective_the_timeout_and_the_rank(tmp_path):
    """Rank 1 stopped (SIGSTOP) mid-run: rank 0 gives up after --dist-timeout with one line of ours."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
           *TINY, "--backend", "synthetic", "--num-classes", "10", "--batch-size", "4", "--eval-freq", "0", "-p", "1",
           "--max-steps", "100000", "--no-plots", "--dist-timeout", "20", "--output", str(tmp_path / "run")]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, stopped = [], None
    try:
        for line in proc.stdout:
            lines.append(line)
            if stopped is None and line.startswith("Epoch [0][3/"):
                stopped = rank_pid(proc.pid, 1)
                assert stopped, "rank 1 not found"
                os.kill(stopped, signal.SIGSTOP)
            if line.startswith("train.py: error:"):
                break
    finally:
        if stopped:
            os.kill(stopped, signal.SIGKILL)  # torchrun would wait 30 s for a stopped process to take its SIGTERM
    proc.communicate(timeout=120)
    text = "".join(lines)
    ours = [line for line in lines if line.startswith("train.py:")]
    assert stopped and len(ours) == 1, text[-3000:]
    assert "rank 0: " in ours[0] and "timed out after --dist-timeout 20 s: rank 1 did not answer" in ours[0]
    assert "Traceback" not in text  # torchrun's own report comes after; ours has none


def test_kill_9_of_a_rank_restarts_under_torchrun_and_ends_as_an_uninterrupted_run(sample_shards, tmp_path):
    # drop path draws random numbers every step: equal weights also prove each rank's streams were restored.
    common = [*TINY, "--data_path", str(sample_shards), "--epochs", "2", "--eval-freq", "0", "-p", "1",
              "--batch-size", "4", "--no-plots", "--drop-path", "0.1", "--save-steps", "2", "--dist-timeout", "60"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    ref, out = tmp_path / "ref", tmp_path / "run"
    proc = subprocess.run([*launch, str(ROOT / "train.py"), *common, "--output", str(ref)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    cmd = [*launch, "--max-restarts", "1", str(ROOT / "train.py"), *common, "--output", str(out), "--resume", "auto"]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, killed = [], None
    for line in proc.stdout:
        lines.append(line)
        if killed is None and line.startswith("Epoch [0][5/"):  # a checkpoint at global step 4 stands
            killed = rank_pid(proc.pid, 1)
            os.kill(killed, signal.SIGKILL)
    proc.wait(timeout=300)
    text = "".join(lines)
    assert killed and proc.returncode == 0, text[-3000:]
    assert "resumed " in text and "epoch 0 step 4 (global 4)" in text
    ours, theirs = checkpoint.load(out / "last.pth"), checkpoint.load(ref / "last.pth")
    assert ours["global_step"] == theirs["global_step"] == 12
    for name, weight in theirs["model"].items():
        assert torch.allclose(ours["model"][name], weight, rtol=0, atol=1e-6), name


RECIPE = ["--mixup", "0.8", "--cutmix", "1.0", "--mixup-mode", "elem", "--reprob", "0.5", "--recount", "2",
          "--model-ema", "--model-ema-decay", "0.9", "--layer-decay", "0.75", "--grad-accum-steps", "2"]


def test_a_recipe_run_resumes_exactly(sample_shards, tmp_path, monkeypatch):
    """Mixup, cutmix, erasing and EMA draw or keep state every step: equal losses and EMA weights after a crash and
    resume prove their streams and averages were saved and restored."""
    common = [*TINY, "--data_path", str(sample_shards), "--batch-size", "4", "--epochs", "2", "--eval-freq", "1",
              "-p", "1", *RECIPE]
    # 12 batches of 4 per epoch, 2 per optimizer step: 6 steps; a checkpoint at step 4, a crash in step 5.
    ref, crashed = run_and_crash(common, tmp_path, monkeypatch, crash_at=5, save_steps=2)
    assert checkpoint.load(crashed / "last.pth")["global_step"] == 4
    run_ok([*common, "--output", str(crashed), "--resume", "auto"])
    expected = {r["global_step"]: r for r in metrics(ref, "train")}
    resumed = metrics(crashed, "train")[-8:]
    assert [r["global_step"] for r in resumed] == list(range(5, 13))
    for r in resumed:
        assert r["loss"] == pytest.approx(expected[r["global_step"]]["loss"], rel=1e-5, abs=1e-6)
    want, got = checkpoint.load(ref / "last.pth"), checkpoint.load(crashed / "last.pth")
    for key, value in want["model_ema"].items():
        torch.testing.assert_close(got["model_ema"][key], value, rtol=0, atol=1e-6)
    assert not all(torch.equal(want["model"][k], v) for k, v in want["model_ema"].items())  # an average, not a copy
    evals = metrics(ref, "eval")
    summary = json.loads((ref / "summary.json").read_text())
    assert summary["best_ema_acc1"] == max(r["ema_acc1"] for r in evals)
    assert summary["best_acc1"] == max(r["acc1"] for r in evals)
    best = max(range(len(evals)), key=lambda i: (evals[i]["ema_acc1"], -i))  # best.pth: the EMA's best epoch
    assert checkpoint.load(ref / "best.pth")["epoch"] == evals[best]["epoch"] + 1


def test_the_ema_is_the_moving_average_of_the_weights():
    from trainlib import distributed
    from trainlib.build import build_trainer
    from trainlib.config import TrainConfig
    from trainlib.runlog import QuietLog

    cfg = TrainConfig(model="test_vit", img_size=32, device="cpu", backend="synthetic", model_ema=True,
                      model_ema_decay=0.8, drop_path=0.0)
    trainer = build_trainer(cfg, devices.resolve_device("cpu"), distributed.placement(cfg), QuietLog(),
                            steps_per_epoch=10, classes=5)
    reference = None
    for step in range(4):
        trainer.step_on([(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.tensor([0, 1, 2, 3]))])
        trainer.global_step += 1
        weights = {k: v.detach().clone() for k, v in trainer.raw_model.state_dict().items()}
        # timm's rule: the first update copies the weights, then ema = d * ema + (1 - d) * weights
        reference = weights if reference is None else {k: 0.8 * reference[k] + 0.2 * w for k, w in weights.items()}
    for key, value in trainer.ema.module.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=1e-6, atol=1e-7)


def test_two_ranks_accumulate_and_repeat_samples(sample_shards, tmp_path):
    """DDP with --grad-accum-steps (no all-reduce on the first micro-batch) and --aug-repeats across two ranks."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train.py"), *TINY, "--data_path", str(sample_shards), "--epochs", "1", "-p", "1",
           "--batch-size", "4", "--grad-accum-steps", "2", "--aug-repeats", "2", "--mixup", "0.5",
           "--output", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "steps/epoch x 4 x 2 x 2 micro-batches" in proc.stdout  # batch x ranks x micro-batches
    assert "some copies of a sample share a rank" not in proc.stdout  # 2 copies, 2 ranks: one copy each
    # 48 samples: 24 of them twice, on 2 ranks, 6 batches of 4 each, 2 per optimizer step.
    assert json.loads((out / "summary.json").read_text())["global_step"] == 3
    assert metrics(out, "eval")[-1]["samples"] == 16


def test_repeats_on_fewer_ranks_than_copies_say_so(sample_shards, tmp_path, capsys):
    run_ok([*TINY, "--data_path", str(sample_shards), "--batch-size", "8", "--epochs", "1", "--aug-repeats", "2",
            "--no-save-checkpoints", "--output", str(tmp_path / "run")])
    assert "--aug-repeats 2 on 1 rank(s): some copies of a sample share a rank" in capsys.readouterr().out
    # 48 samples: the first 24 of the epoch, twice each, in 6 batches of 8
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["global_step"] == 6


def test_a_run_opens_its_shard_set_once(sample_shards, tmp_path, monkeypatch):
    """The manifest and class list are read once per process start (on s3:// each read is a GET), by a fresh run
    with evaluation and by a resume alike; the loaders, the class count and the checkpoint's record share them."""
    from collections import Counter

    from pipeline.shards import storage

    reads = Counter()
    real = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda path: reads.update([Path(path).name]) or real(path))
    common = [*TINY, "--data_path", str(sample_shards), "--batch-size", "8", "--epochs", "2", "--output",
              str(tmp_path / "run"), "--no-plots"]
    for argv in ([*common, "--max-steps", "2"], [*common, "--resume", "auto", "--max-steps", "7"]):
        reads.clear()
        run_ok(argv)
        assert (reads["manifest.json"], reads["classes.json"]) == (1, 1), argv


@pytest.mark.parametrize("epochs", [1, 2])
def test_a_stop_in_an_epochs_last_step_resumes_with_its_evaluation(sample_shards, tmp_path, monkeypatch, capsys,
                                                                   epochs):
    """SIGTERM during the last step of epoch 0: the checkpoint's loader stands at epoch 1 already; the resume still
    evaluates epoch 0 and writes its epoch-end checkpoint before training on (with --epochs 1: the run's end)."""
    out = tmp_path / "run"
    common = [*TINY, "--data_path", str(sample_shards), "--batch-size", "8", "--epochs", str(epochs), "--output",
              str(out), "--no-plots", "-p", "1"]
    real = Trainer.train_batch

    def signalled_in_the_last_step(self, batches, wait_s):
        if self.step_in_epoch + 1 == self.epoch_steps:
            os.kill(os.getpid(), signal.SIGTERM)  # the real handler: a stop at the next step boundary
        return real(self, batches, wait_s)

    monkeypatch.setattr(Trainer, "train_batch", signalled_in_the_last_step)
    assert train.main(common) == train.EXIT_PREEMPTED
    state = checkpoint.load(out / "last.pth")
    assert (state["epoch"], state["step_in_epoch"], state["loader"]["epoch"], state["loader"]["batch"]) == (0, 6, 1, 0)
    monkeypatch.setattr(Trainer, "train_batch", real)
    capsys.readouterr()
    run_ok([*common, "--resume", "auto"])
    assert [(r["epoch"], r["global_step"]) for r in metrics(out, "eval")] == [(e, 6 * (e + 1)) for e in range(epochs)]
    assert [r["global_step"] for r in metrics(out, "train")][6:] == list(range(7, 6 * epochs + 1))
    assert checkpoint.load(out / "last.pth")["epoch"] == epochs and (out / "summary.json").is_file()
