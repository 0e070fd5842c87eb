"""tools/compare_runs.py: per-epoch curves from train.py's metrics.jsonl, side by side."""
import json

import compare_runs
import pytest


def write_run(folder, losses: dict, accs: dict):
    folder.mkdir()
    rows = [{"kind": "train", "epoch": e, "loss": v, "img_s": 10.0} for e, vs in losses.items() for v in vs]
    rows += [{"kind": "eval", "epoch": e, "acc1": a, "acc5": 100.0} for e, a in accs.items()]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_epochs_line_up_and_losses_average(tmp_path, capsys):
    write_run(tmp_path / "a", {0: [2.0, 1.0], 1: [0.5]}, {1: 75.0})
    write_run(tmp_path / "b", {0: [3.0]}, {0: 40.0})
    out = tmp_path / "c.json"
    assert compare_runs.main([str(tmp_path / "a"), str(tmp_path / "b"), "--json", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "| 0 | 1.5000 | – | 3.0000 | 40.0 |"
    assert lines[3] == "| 1 | 0.5000 | 75.0 | – | – |"
    assert json.loads(out.read_text())["a"]["1"]["acc1"] == 75.0


def test_a_folder_without_metrics_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        compare_runs.main([str(tmp_path)])


def test_steps_a_resume_trained_again_count_once_with_the_resumed_values(tmp_path):
    """A run killed after step 3, resumed from its checkpoint at step 2: metrics.jsonl holds step 3 twice, and the
    resume marker says the first one was superseded."""
    run = tmp_path / "resumed"
    run.mkdir()
    rows = [{"kind": "train", "epoch": 0, "global_step": s, "loss": v} for s, v in ((1, 4.0), (2, 3.0), (3, 9.0))]
    rows += [{"kind": "resume", "from_step": 3, "next_step": 3, "epoch": 0, "checkpoint": "last.pth"},
             {"kind": "train", "epoch": 0, "global_step": 3, "loss": 2.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert compare_runs.curve(run) == {0: {"loss": 3.0}}
