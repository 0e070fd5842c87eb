"""tools/project_schedule.py: a schedule's time from tools/bench_train.py's img/s at each side."""
import json
import subprocess
import sys
from pathlib import Path

import bench_train
import project_schedule
import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "project_schedule.py"
TINY = ["--model", "test_vit", "--num-classes", "4", "--batch-size", "4", "--warmup", "1", "--steps", "2",
        "--device", "cpu", "--amp", "fp32", "--loops", "b"]
RAMP = ["--img-size", "48", "--patch", "16", "--min-res", "16", "--start-ramp", "1", "--end-ramp", "3",
        "--epochs", "4", "--images", "1000"]  # epochs at 16, 16, 32, 48 px


def test_a_ramp_is_projected_from_the_img_s_measured_at_its_sides(tmp_path, capsys):
    results = tmp_path / "r.jsonl"
    for side in (16, 32, 48):  # test_vit's patch is 16
        bench_train.main(TINY + ["--img-size", str(side), "--out", str(results)])
    img_s = {r["img_size"]: r["img_s"] for r in map(json.loads, results.read_text().splitlines())
             if r["loop"] == "ours_synthetic"}
    capsys.readouterr()
    out = project_schedule.main([str(results), "--model", "test_vit", "--loop", "ours_synthetic", *RAMP])
    assert out["epoch_s"] == pytest.approx([1000 / img_s[s] for s in (16, 16, 32, 48)], abs=0.06)
    assert out["schedule_s"] == pytest.approx(sum(out["epoch_s"]), abs=0.2)
    assert out["fixed_s"] == pytest.approx(4000 / img_s[48], abs=0.06)
    assert out["less_time"] == pytest.approx(out["fixed_s"] / out["schedule_s"], rel=0.01)
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == out


def rows_file(tmp_path, rows):
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps({"model": "m", "batch_size": 256, **r}) + "\n" for r in rows))
    return str(results)


def test_the_first_loop_measured_at_a_side_wins_and_a_rerun_supersedes(tmp_path):
    results = rows_file(tmp_path, [
        {"loop": "ours_dynamic", "img_size": 16, "img_s": 100.0},
        {"loop": "ours_synthetic", "img_size": 16, "img_s": 999.0},  # second choice: not taken at 16
        {"loop": "ours_synthetic", "img_size": 32, "img_s": 80.0},  # no ours_dynamic at 32, nor at 48 in batch 256
        {"loop": "ours_synthetic", "img_size": 48, "img_s": 1.0},
        {"loop": "ours_synthetic", "img_size": 48, "img_s": 50.0},  # the rerun
        {"loop": "ours_dynamic", "img_size": 48, "img_s": 7.0, "batch_size": 512},  # another batch size
    ])
    out = project_schedule.main([results, "--model", "m", "--batch-size", "256", "--loop", "ours_dynamic",
                                 "--loop", "ours_synthetic", *RAMP])
    assert out["epoch_s"] == [10.0, 10.0, 12.5, 20.0]
    assert out["fixed_s"] == 80.0 and out["less_time"] == round(80 / 52.5, 4)
    assert out["img_s"]["16"] == {"loop": "ours_dynamic", "img_s": 100.0}


@pytest.mark.parametrize("flags, message", [
    (RAMP, "no ours_dali figure for m at 32 px in"),
    (RAMP + ["--loop", "ours_host"], "figures at batch sizes 64, 256: choose one with --batch-size"),
    (["--min-res", "20", "--end-ramp", "2", "--epochs", "3", "--img-size", "48", "--patch", "16"],
     "--min-res 20 is not a multiple of 16"),
])
def test_a_missing_side_or_a_bad_schedule_is_one_line(tmp_path, flags, message):
    results = rows_file(tmp_path, [{"loop": "ours_dali", "img_size": s, "img_s": 10.0} for s in (16, 48)]
                        + [{"loop": "ours_host", "img_size": s, "img_s": 10.0, "batch_size": b}
                           for s in (16, 32, 48) for b in (64, 256)])
    run = subprocess.run([sys.executable, str(TOOL), results, "--model", "m", *flags], capture_output=True,
                         text=True)
    assert run.returncode == 1 and message in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr
