"""tools/bench_train.py on CPU with a tiny ViT: the three loops run and the ratios come out of their figures."""
import json

import pytest

from tools import bench_train

TINY = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--num-classes", "4", "--batch-size", "4",
        "--warmup", "1", "--steps", "3", "--device", "cpu", "--amp", "fp32", "--model-kwargs", '{"depth": 1}']


def test_all_three_loops_report_and_ratios_follow(sample_shards, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    summary = bench_train.main(TINY + ["--backend", "host", "--data_path", str(sample_shards), "--workers", "1",
                                       "--out", str(out)])
    lines = [json.loads(s) for s in out.read_text().splitlines()]
    by_loop = {r["loop"]: r for r in lines}
    assert set(by_loop) == {"baseline", "ours_synthetic", "ours_host", "summary"}
    assert all(r["img_s"] > 0 for k, r in by_loop.items() if k != "summary")
    assert summary["step_speedup"] == pytest.approx(by_loop["ours_synthetic"]["img_s"] / by_loop["baseline"]["img_s"],
                                                    rel=1e-3)
    assert summary["feed_ratio"] == pytest.approx(by_loop["ours_host"]["img_s"] / by_loop["ours_synthetic"]["img_s"],
                                                  rel=1e-3)
    assert 0 <= summary["input_wait"] <= 1
    assert capsys.readouterr().out.count("\n") == 4  # the same lines went to stdout


def test_real_backend_without_shards_is_a_usage_error():
    with pytest.raises(SystemExit) as e:
        bench_train.main(TINY + ["--backend", "host"])
    assert e.value.code == 2
