"""tools/bench_report.py: the docs' summary objects come out of a real bench_train run's lines, ratios intact."""
import json

import bench_report
import bench_train
import pytest

from tests.test_bench_train import TINY


def test_summary_objects_carry_the_ratios_and_their_figures(sample_shards, tmp_path, capsys):
    raw = tmp_path / "results.jsonl"
    raw.write_text(json.dumps({"stage": "versions", "device": "cpu", "torch": "x", "dali": "y"}) + "\n")
    bench_train.main(TINY + ["--data_path", str(sample_shards), "--feed", "host:workers=1", "--out", str(raw)])
    with raw.open("a") as f:  # what bench_gpu.sh appends after a pipeline.bench run
        f.write(json.dumps({"final": True, "img_s": 123.4, "backend": "host", "workers": 2, "batch_size": 8}) + "\n")
        f.write(json.dumps({"stage": "alone_host", "rc": 0}) + "\n")
    out = tmp_path / "summary.json"
    assert bench_report.main([str(raw), "--json", str(out), "--markdown"]) == 0
    report = json.loads(out.read_text())
    [t] = report["training"]
    lines = {r["loop"]: r for r in map(json.loads, raw.read_text().splitlines()) if "loop" in r}
    for key in ("device", "backend", "batch_size", "step_speedup", "feed_ratio"):
        assert key in t, key
    assert t["backend"] == "host" and t["batch_size"] == 4 and t["dali"] == "y"
    assert t["fed_img_s"] == lines["ours_host"]["img_s"] and t["baseline_img_s"] == lines["baseline"]["img_s"]
    assert t["feed_ratio"] == lines["summary"]["feed_ratio"]
    assert report["pipeline_alone"] == [{"stage": "alone_host", "device": "cpu", "backend": "host", "batch_size": 8,
                                         "workers": 2, "img_s": 123.4}]
    table = capsys.readouterr().out
    assert f"| {t['step_speedup']:.3f} | {t['feed_ratio']:.3f} |" in table and "| alone_host | 8 | 2 | 123 |" in table


def test_bad_input_fails_in_one_line(tmp_path):
    bad = tmp_path / "r.jsonl"
    bad.write_text('{"loop": "baseline"}\nnot json\n')
    with pytest.raises(SystemExit, match=r"r.jsonl:2: not a JSON line"):
        bench_report.main([str(bad)])
    empty = tmp_path / "e.jsonl"
    empty.write_text('{"stage": "env", "rc": 0}\n')
    assert bench_report.main([str(empty)]) == 1
    with pytest.raises(SystemExit) as e:
        bench_report.main([str(tmp_path / "missing.jsonl")])
    assert e.value.code == 2


def test_runs_in_one_file_stay_apart(tmp_path):
    def run(tag, loops):
        common = {"run": tag, "batch_size": 8, "device": "cpu", "model": "m", "amp": "bf16", "compile": False}
        return [{**common, "loop": name, "img_s": img_s} for name, img_s in loops] + [
                {**common, "loop": "summary", "step_speedup": 1.0}]
    raw = tmp_path / "r.jsonl"
    rows = run("one", [("baseline", 10.0), ("ours_synthetic", 10.0), ("ours_fp8", 5.0)]) + \
        run("two", [("baseline", 20.0), ("ours_synthetic", 20.0)])
    raw.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first, second = bench_report.summarize(bench_report.read_lines(raw))["training"]
    assert first["fp8_img_s"] == 5.0 and first["fp8_vs_ours"] == 0.5
    assert second["baseline_img_s"] == 20.0 and "fp8_img_s" not in second  # not the first run's
