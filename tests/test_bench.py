"""pipeline.bench: short runs print JSON lines whose last one carries the figures."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.bench import throughput as bench
from pipeline.loader import Loader, LoaderSpec

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["--batch-size", "4", "--workers", "1", "--seconds", "1", "--interval", "0.4", "--warmup", "1",
         "--img-size", "32"]


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_host_run_reports_img_s(sample_shards, capsys):
    assert bench.main(["--data_path", str(sample_shards), "--backend", "host", *QUICK]) == 0
    lines = json_lines(capsys.readouterr().out)
    assert len(lines) >= 2 and all(line["img_s"] > 0 for line in lines)
    last = lines[-1]
    assert last["final"] and last["backend"] == "host" and last["workers"] == 1 and last["batch_size"] == 4
    assert "Pillow" in last["pillow"] and last["mb_s"] > 0 and 0 <= last["data_wait"] <= 1
    from pipeline.shards.format import read_manifest
    assert last["restart_markers"] is read_manifest(sample_shards).settings.restart_markers  # the set's, as made


def test_cli_with_baseline_reports_ratio(sample_shards, sample_folder):
    out = subprocess.run([sys.executable, "-m", "pipeline.bench", "--data_path", str(sample_shards),
                          "--baseline", str(sample_folder), *QUICK], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    last = json_lines(out.stdout)[-1]
    assert last["img_s"] > 0 and last["baseline_img_s"] > 0
    assert last["ratio"] == round(last["img_s"] / last["baseline_img_s"], 2)


def test_synthetic_needs_no_data(capsys):
    assert bench.main(["--backend", "synthetic", *QUICK]) == 0
    assert json_lines(capsys.readouterr().out)[-1]["img_s"] > 0


def test_bad_data_path_is_one_clear_line(tmp_path, capsys):
    assert bench.main(["--data_path", str(tmp_path), "--backend", "host", *QUICK]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "manifest" in err[0]


class PaddedLoader(Loader):
    """Batches of 4 with one padding label (-1) each; counts the real samples it handed out."""

    def __init__(self):
        super().__init__(LoaderSpec(data_path=None, split="val", batch_size=4, device=torch.device("cpu"), workers=2))
        self.real = 0

    def batches_in(self, epoch=None):
        return 3

    def _batches(self, position):
        while True:
            self.real += 3
            yield torch.zeros(4, 3, 8, 8), torch.tensor([0, 1, 2, -1])


def test_val_padding_is_not_counted_as_images():
    cfg = bench.BenchConfig(seconds=0.2, interval=1.0, warmup=0, workers=4)
    loader = PaddedLoader()
    result = bench.measure(loader, cfg, torch.device("cpu"), lambda images, labels: None, "fake",
                           time.perf_counter())
    assert result["images"] == loader.real > 0
    # The workers started, not those asked for (img_s is itself rounded, hence the tolerance).
    assert result["img_s_per_worker"] == pytest.approx(result["img_s"] / 2, abs=0.1)


def test_workers_reported_are_the_ones_started(sample_shards, capsys):
    # 16 val samples in batches of 12: 2 steps, so of the 4 workers asked for, the host backend starts 2.
    argv = ["--data_path", str(sample_shards), "--backend", "host", "--split", "val", "--batch-size", "12",
            "--workers", "4", "--seconds", "1", "--interval", "5", "--warmup", "0", "--img-size", "32"]
    assert bench.main(argv) == 0
    last = json_lines(capsys.readouterr().out)[-1]
    assert last["workers"] == 2
    assert last["workers_pss_mb"] > 0 and last["first_batch_s"] > 0  # the two workers were up at the first batch


class SlowStartLoader(Loader):
    """Three batches an epoch; the first of each epoch takes 50 ms, as a loader that restarts per epoch would."""

    def __init__(self):
        super().__init__(LoaderSpec(data_path=None, split="train", batch_size=2, device=torch.device("cpu")))

    def batches_in(self, epoch=None):
        return 3

    def _batches(self, position):
        for i in range(position.batch, 3):
            if i == 0:
                time.sleep(0.05)
            yield torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.int64)


def test_epoch_boundary_waits_are_reported_apart(capsys):
    cfg = bench.BenchConfig(seconds=0.5, interval=10.0, warmup=1, step_ms=2.0)
    built_at = time.perf_counter()
    result = bench.measure(SlowStartLoader(), cfg, torch.device("cpu"), bench.model_step(cfg, 4, "cpu"), "slow",
                           built_at)
    assert 0.05 <= result["first_batch_s"] <= time.perf_counter() - built_at  # the first batch's 50 ms, once
    assert result["boundary_wait_s"] >= 0.05 > 0.02 > result["batch_wait_s"]
    # Warm-up took batch 0; from there every third batch starts an epoch.
    assert result["epoch_starts"] == result["images"] // 2 // 3 + (result["images"] // 2 % 3 > 2)


def test_a_bad_dtype_split_or_float_is_a_usage_error_before_any_worker_starts(sample_shards):
    cases = {("--dtype", "int7"): "argument --dtype: invalid choice: 'int7' (choose from 'float32', 'bfloat16', "
                                  "'float16', 'uint8')",
             ("--split", "vall"): "argument --split: invalid choice: 'vall' (choose from 'train', 'val')",
             ("--step-ms", "nan"): "argument --step-ms/--step_ms: takes a finite number, got 'nan'"}
    procs = [(error, subprocess.Popen([sys.executable, "-m", "pipeline.bench", "--data_path", str(sample_shards),
                                       "--backend", "host", *QUICK, *argv], cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)) for argv, error in cases.items()]
    for error, proc in procs:
        out, err = proc.communicate(timeout=120)
        assert (proc.returncode, out, err.splitlines()) == \
            (2, "", ["usage: python -m pipeline.bench [-h] [options]", f"python -m pipeline.bench: error: {error}"])
