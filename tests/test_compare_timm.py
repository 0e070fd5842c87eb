"""tools/compare_timm.py: one recipe, the same flag strings for timm's train.py and ours; the results read from
timm's log and our run folder."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

import compare_timm
from trainlib.config import parse_config

LOG = """\
Test: [   0/3]  Time: 0.300 (0.300)  Loss:   1.300 ( 1.300)  Acc@1:  70.312 ( 70.312)  Acc@5:  98.438 ( 98.438)
Test: [   3/3]  Time: 0.021 (0.148)  Loss:   1.088 ( 1.225)  Acc@1:  87.500 ( 72.500)  Acc@5: 100.000 ( 98.500)
Test (EMA): [   0/3]  Time: 0.331 (0.331)  Loss:   1.211 ( 1.211)  Acc@1:  76.562 ( 76.562)  Acc@5:  98.438 ( 98.438)
Test (EMA): [   3/3]  Time: 0.025 (0.151)  Loss:   1.196 ( 1.314)  Acc@1:  87.500 ( 71.500)  Acc@5: 100.000 ( 98.000)
"""


def test_timms_final_accuracies_are_the_running_means_of_the_last_batches():
    assert compare_timm.timm_result(LOG) == {"acc1": 72.5, "ema_acc1": 71.5}
    earlier = LOG.replace("72.500", "60.000").replace("71.500", "61.000")
    assert compare_timm.timm_result(earlier + LOG) == {"acc1": 72.5, "ema_acc1": 71.5}  # the last epoch's


def test_both_trainers_get_the_same_recipe_and_ours_takes_it_as_it_is(sample_shards, tmp_path):
    args = argparse.Namespace(epochs=2, batch_size=8, workers=1, model="test_vit", img_size=32, data=sample_shards,
                              timm_train=tmp_path / "train.py", device="cpu", backend="host")
    cmds = compare_timm.commands(args, seed=3, out=tmp_path)
    for cmd in cmds.values():
        start = cmd.index(compare_timm.RECIPE[0])
        assert cmd[start:start + len(compare_timm.RECIPE)] == compare_timm.RECIPE
    assert "wds/" + Path(sample_shards).name in cmds["timm"] and "--no-prefetcher" in cmds["timm"]
    cfg = parse_config(cmds["ours"][2:])  # every flag of the recipe is one of train.py's
    assert (cfg.mixup, cfg.cutmix, cfg.reprob, cfg.model_ema, cfg.aa, cfg.seed) == (
        0.8, 1.0, 0.25, True, "rand-m9-mstd0.5-inc1", 3)


def test_a_missing_timm_train_py_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        compare_timm.main(["--timm-train", str(tmp_path / "nope.py"), "--data", str(tmp_path)])
    assert e.value.code == 2 and "no such file" in capsys.readouterr().err
