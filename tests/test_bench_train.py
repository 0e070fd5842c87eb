"""tools/bench_train.py on CPU with a tiny ViT: the three loops run and the ratios come out of their figures."""
import json

import bench_train
import pytest

TINY = ["--model", "test_vit", "--img-size", "32", "--num-classes", "4", "--batch-size", "4",
        "--warmup", "1", "--steps", "3", "--device", "cpu", "--amp", "fp32"]


def test_all_three_loops_report_and_ratios_follow(sample_shards, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    summary = bench_train.main(TINY + ["--backend", "host", "--data_path", str(sample_shards), "--workers", "1",
                                       "--out", str(out)])
    lines = [json.loads(s) for s in out.read_text().splitlines()]
    by_loop = {r["loop"]: r for r in lines}
    assert set(by_loop) == {"baseline", "ours_synthetic", "ours_host", "summary"}
    assert all(r["img_s"] > 0 for k, r in by_loop.items() if k != "summary")
    assert summary["step_speedup"] == pytest.approx(by_loop["ours_synthetic"]["img_s"] / by_loop["baseline"]["img_s"],
                                                    rel=1e-3, abs=1e-4)
    assert summary["feed_ratio"] == pytest.approx(by_loop["ours_host"]["img_s"] / by_loop["ours_synthetic"]["img_s"],
                                                  rel=1e-3, abs=1e-4)
    assert 0 <= summary["input_wait"] <= 1
    assert capsys.readouterr().out.count("\n") == 4  # the same lines went to stdout


def test_real_backend_without_shards_is_a_usage_error():
    with pytest.raises(SystemExit) as e:
        bench_train.main(TINY + ["--backend", "host"])
    assert e.value.code == 2


def test_feeds_fp8_and_recheck_share_one_baseline(sample_shards, tmp_path):
    out = tmp_path / "r.jsonl"
    bench_train.main(TINY + ["--data_path", str(sample_shards), "--feed", "host:workers=1,aa=rand-m9-mstd0.5-inc1",
                             "--feed", "dali:workers=1,name=dali_w1,readers=1", "--fp8", "--recipe", "--recheck",
                             "--out", str(out)])
    lines = [json.loads(s) for s in out.read_text().splitlines()]
    loops = [r["loop"] for r in lines]
    assert loops == ["baseline", "ours_synthetic", "ours_host", "ours_dali_w1", "ours_fp8", "ours_recipe",
                     "ours_synthetic_end", "summary", "summary"]
    assert len({r["run"] for r in lines}) == 1
    by_loop = {r["loop"]: r for r in lines if r["loop"] != "summary"}
    summaries = {r["feed"]: r for r in lines if r["loop"] == "summary"}
    assert {s["backend"] for s in summaries.values()} == {"host", "dali"}
    assert by_loop["ours_dali_w1"]["backend"] == "dali" and by_loop["ours_dali_w1"]["steps_per_epoch"] > 0
    assert by_loop["ours_dali_w1"]["readers"] == 1 and "readers" not in by_loop["ours_host"]
    assert by_loop["ours_host"]["aa"] == "rand-m9-mstd0.5-inc1" and by_loop["ours_dali_w1"]["aa"] is None
    for name, s in summaries.items():
        assert s["feed_ratio"] == pytest.approx(by_loop[f"ours_{name}"]["img_s"] / by_loop["ours_synthetic"]["img_s"],
                                                rel=1e-3, abs=1e-4)
        assert s["fp8_speedup"] == pytest.approx(by_loop["ours_fp8"]["img_s"] / by_loop["baseline"]["img_s"],
                                                 rel=1e-3, abs=1e-4)
        assert s["fp8_vs_ours"] == pytest.approx(by_loop["ours_fp8"]["img_s"] / by_loop["ours_synthetic"]["img_s"],
                                                 rel=1e-3, abs=1e-4)
        assert s["recipe_cost"] == pytest.approx(by_loop["ours_recipe"]["img_s"] / by_loop["ours_synthetic"]["img_s"],
                                                 rel=1e-3, abs=1e-4)
        assert s["drift"] == pytest.approx(by_loop["ours_synthetic_end"]["img_s"] / by_loop["ours_synthetic"]["img_s"],
                                           rel=1e-3, abs=1e-4)
        assert 0 <= by_loop[f"ours_{name}"]["max_wait_s"] <= by_loop[f"ours_{name}"]["seconds"]


@pytest.mark.parametrize("feed", ["tape:workers=1", "host:workers", "host:threads=2", "host,name=x", "host:readers=1",
                                  "dali:readers=yes", "dali:readers=0", "dali:workers=two", "dali:workers=0",
                                  "dali:hw_decoder_load=2", "host:steps=0", "host:steps=2,epochs=1"])
def test_bad_feed_is_a_usage_error(sample_shards, feed):
    with pytest.raises(SystemExit) as e:
        bench_train.main(TINY + ["--data_path", str(sample_shards), "--feed", feed])
    assert e.value.code == 2


def test_feed_names_must_differ(sample_shards):
    with pytest.raises(SystemExit) as e:
        bench_train.main(TINY + ["--data_path", str(sample_shards), "--feed", "host", "--feed", "host:workers=2"])
    assert e.value.code == 2


def test_a_failing_feed_is_reported_and_the_run_goes_on(sample_shards, tmp_path):
    out = tmp_path / "r.jsonl"
    summary = bench_train.main(TINY + ["--data_path", str(sample_shards), "--feed", f"host:data_path={tmp_path}",
                                       "--feed", "host:workers=1,name=ok", "--out", str(out)])
    lines = {r["loop"] + r.get("feed", ""): r for r in map(json.loads, out.read_text().splitlines())}
    assert "manifest" in lines["ours_host"]["error"]  # tmp_path holds no shards
    assert "feed_ratio" not in lines["summaryhost"] and lines["summaryok"]["feed_ratio"] > 0
    assert summary is not None


def test_epochs_key_times_whole_epochs_and_failed_loops_are_listed(sample_shards, tmp_path):
    out = tmp_path / "r.jsonl"
    summary = bench_train.main(TINY + ["--data_path", str(sample_shards), "--loops", "c", "--out", str(out),
                                       "--feed", "host:workers=1,epochs=2",
                                       "--feed", f"host:data_path={tmp_path},name=bad"])
    lines = {r["loop"]: r for r in map(json.loads, out.read_text().splitlines()) if r["loop"] != "summary"}
    assert lines["ours_host"]["steps"] == 2 * lines["ours_host"]["steps_per_epoch"]
    assert summary["failed"] == ["ours_bad"]


def test_ours_is_train_py_step(monkeypatch):
    from trainlib.engine import Trainer
    calls = []
    real = Trainer.step_on
    monkeypatch.setattr(Trainer, "step_on", lambda self, b: calls.append(self.cfg.fp8) or real(self, b))
    bench_train.main(TINY + ["--loops", "b", "--fp8"])
    assert calls == [False] * 4 + [True] * 4  # (b) then (d): warm-up 1 + 3 timed steps each, both train.py's step


def test_dynamic_from_trains_a_model_of_another_side_on_the_input_side(monkeypatch, tmp_path):
    from trainlib.engine import Trainer
    calls = []
    real = Trainer.step_on
    monkeypatch.setattr(Trainer, "step_on", lambda self, b: calls.append((self.cfg.img_size, b[0][0].shape[-1])) or
                        real(self, b))
    out = tmp_path / "r.jsonl"
    summary = bench_train.main(TINY + ["--loops", "b", "--dynamic-from", "48", "--out", str(out)])
    assert calls == [(32, 32)] * 4 + [(48, 32)] * 4  # (b), then (f): the model of 48 px fed 32 px batches
    by_loop = {r["loop"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert by_loop["ours_dynamic"]["model_side"] == 48 and by_loop["ours_dynamic"]["img_size"] == 32
    assert summary["dynamic_cost"] == pytest.approx(by_loop["ours_dynamic"]["img_s"] /
                                                    by_loop["ours_synthetic"]["img_s"], rel=1e-3, abs=1e-4)


def test_step_flags_become_train_py_config(capsys):
    from trainlib.bench.steps import StepConfig
    assert StepConfig() == StepConfig("vit_base_patch32_224", 224, 1000, 256, "bf16", False, 1.0, "auto")
    args, feeds = bench_train.parse_args(TINY + ["--clip-grad", "0.5", "--compile"])
    cfg = args.train_config(fp8=True)
    assert feeds == [] and (cfg.backend, cfg.device, cfg.model, cfg.img_size, cfg.num_classes, cfg.batch_size) \
        == ("synthetic", "cpu", "test_vit", 32, 4, 4)
    assert (cfg.amp, cfg.clip_grad, cfg.compile, cfg.fp8) == ("fp32", 0.5, True, True)
    with pytest.raises(SystemExit) as e:
        bench_train.main(TINY + ["--clip-grad", "-1"])  # refused before any loop runs, as train.py refuses it
    assert e.value.code == 2 and "--clip-grad must be >= 0" in capsys.readouterr().err
