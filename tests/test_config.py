"""trainlib/config.py: the seed's ModelZoo flags keep their names and meaning, new flags parse, bad input exits 2,
and the launch flags map onto the env:// rendezvous as docs/training.md says."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from pipeline.dali import DaliOptions
from pipeline.host import HostOptions
from pipeline.hybrid import HybridOptions
from trainlib import distributed
from trainlib.config import ConfigError, TrainConfig, build_parser, markdown_table, parse_config

SEED_8P = ["--data_path=/data/imagenet", "--addr=10.0.0.7", "--seed=49", "--workers=128", "--learning-rate=0.8",
           "--momentum=0.9", "--weight-decay=1.0e-04", "--print-freq=1", "--dist-url=tcp://127.0.0.1:23456",
           "--dist-backend", "hccl", "--multiprocessing-distributed", "--world-size=1", "--rank=0",
           "--device=npu", "--epochs=90", "--amp", "--batch-size=2048", "--gpu", "0"]


def test_seed_flags_parse_with_seed_meaning():
    cfg = parse_config(SEED_8P)
    assert (cfg.data_path, cfg.addr, cfg.seed, cfg.workers, cfg.lr) == ("/data/imagenet", "10.0.0.7", 49, 128, 0.8)
    assert (cfg.momentum, cfg.weight_decay, cfg.print_freq, cfg.epochs, cfg.batch_size) == (0.9, 1e-4, 1, 90, 2048)
    assert (cfg.dist_backend, cfg.multiprocessing_distributed, cfg.world_size, cfg.rank) == ("hccl", True, 1, 0)
    assert (cfg.device, cfg.gpu, cfg.amp) == ("npu", 0, "auto")  # bare --amp: mixed precision on


def test_short_and_alias_spellings():
    cfg = parse_config(["--data-path", "x", "--lr", "0.1", "--wd", "0.2", "-p", "3", "-b", "4", "-j", "5"])
    assert (cfg.data_path, cfg.lr, cfg.weight_decay, cfg.print_freq, cfg.batch_size, cfg.workers) == \
        ("x", 0.1, 0.2, 3, 4, 5)


@pytest.mark.parametrize("argv, amp", [([], "auto"), (["--amp"], "auto"), (["--amp", "bf16"], "bf16"),
                                       (["--amp", "fp16"], "fp16"), (["--no-amp"], "fp32"), (["--amp=fp32"], "fp32")])
def test_amp_modes(argv, amp):
    assert parse_config(["--backend", "synthetic", *argv]).amp == amp


def test_booleans_are_switches():
    assert parse_config(["--backend", "synthetic", "--channels-last"]).channels_last is True
    assert parse_config(["--backend", "synthetic", "--no-fused-opt"]).fused_opt is False


@pytest.mark.parametrize("argv", [["--bogus"], ["--backend", "synthetic", "--batch-size", "0"],
                                  ["--backend", "host"], ["--backend", "synthetic", "--amp", "fp8"],
                                  ["--backend", "synthetic", "--evaluate"], ["--backend", "synthetic", "--lr=-1"],
                                  ["--backend", "synthetic", "--batch"],  # no abbreviations either
                                  ["--backend", "dali", "--data_path", "x", "--on-error", "skip"],
                                  ["--backend", "synthetic", "--model", "vit_nope"],
                                  ["--backend", "dali", "--data_path", "x", "--dali-hw-decoder-load", "1.5"],
                                  ["--backend", "host", "--data_path", "x", "--host-start-method", "fork"],
                                  ["--backend", "host", "--data_path", "x", "--host-timeout-s", "0"]])
def test_bad_input_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(argv)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("argv, line", [(["--aa", "rand-q9"], "error: --aa rand-q9: unknown section q9;"),
                                        (["--color-jitter", "x"], "error: --color-jitter x: want a number")])
def test_a_bad_augmentation_flag_is_one_line_naming_it(argv, line, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(["--backend", "synthetic", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and line in err.strip().splitlines()[-1]  # argparse's usage, then the one line
    assert parse_config(["--backend", "synthetic", "--aa", "rand-m9-mstd0.5-inc1"]).aa == "rand-m9-mstd0.5-inc1"


def test_backend_options_come_from_their_own_flags():
    cfg = parse_config(["--backend", "dali", "--data_path", "x", "--dali-hw-decoder-load", "1", "--dali-readers", "3",
                        "--host-slots-per-worker", "3"])
    assert cfg.backend_options() == DaliOptions(hw_decoder_load=1.0, readers=3)
    assert cfg.host == HostOptions(slots_per_worker=3)
    assert parse_config(["--backend", "synthetic"]).backend_options() is None
    assert json.loads(json.dumps(cfg.to_dict()))["dali"]["hw_decoder_load"] == 1.0  # config.json holds plain values


def test_hybrid_options_nest_and_their_parts_are_the_runs_dali_and_host_options(capsys):
    cfg = parse_config(["--backend", "hybrid", "--data_path", "x", "--hybrid-dali-share", "0.25", "--dali-readers", "3",
                        "--host-slots-per-worker", "4"])
    assert cfg.backend_options() == HybridOptions(dali_share=0.25, dali=DaliOptions(readers=3),
                                                  host=HostOptions(slots_per_worker=4))
    assert "--hybrid-dali-readers" not in build_parser().format_help()  # the parts add no flags of their own
    assert cfg.to_dict()["hybrid"] == {"dali_share": 0.25}  # config.json holds each value once
    made = dataclasses.replace(TrainConfig(backend="hybrid"), dali=DaliOptions(readers=5))  # not through the flags
    assert made.backend_options().dali.readers == 5
    with pytest.raises(SystemExit):
        parse_config(["--backend", "hybrid", "--data_path", "x", "--hybrid-dali-share", "1"])
    assert "hybrid option dali_share must be between 0 and 1" in capsys.readouterr().err


def test_rendezvous_from_seed_flags():
    env = {}
    distributed.rendezvous_env(parse_config(["--backend", "synthetic", "--dist-url", "tcp://10.1.2.3:23456"]), env)
    assert env == {"MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "23456"}
    env = {}
    distributed.rendezvous_env(parse_config(SEED_8P), env)  # --addr names the master over the url's 127.0.0.1
    assert env == {"MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "23456"}
    env = {}
    distributed.rendezvous_env(parse_config(["--backend", "synthetic"]), env)
    assert env == {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": distributed.DEFAULT_PORT}
    with pytest.raises(ConfigError, match="dist-url"):
        distributed.rendezvous_env(parse_config(["--backend", "synthetic", "--dist-url", "file:///x"]), {})


def test_torchrun_places_the_process_and_disagreeing_rank_flags_are_one_line():
    cfg = parse_config(["--backend", "synthetic", "--rank", "1", "--world-size", "4", "--gpu", "3"])
    assert distributed.placement(cfg, {}) == distributed.Placement(1, 4, 3)
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    # The defaults (what launch scripts pass) and agreeing values are fine; --multiprocessing-distributed counts nodes.
    assert distributed.placement(parse_config(["--backend", "synthetic"]), env) == distributed.Placement(5, 8, 1)
    agree = parse_config(["--backend", "synthetic", "--world-size", "8", "--rank", "5"])
    assert distributed.placement(agree, env) == distributed.Placement(5, 8, 1)
    nodes = parse_config(["--backend", "synthetic", "--world-size", "2", "--rank", "1",
                          "--multiprocessing-distributed"])
    assert distributed.placement(nodes, env) == distributed.Placement(5, 8, 1)
    with pytest.raises(ConfigError, match=r"--world-size 4, but torchrun started 8 processes \(WORLD_SIZE=8\)"):
        distributed.placement(cfg, env)
    with pytest.raises(ConfigError, match=r"--rank 2, but torchrun made this process's rank 5"):
        distributed.placement(parse_config(["--backend", "synthetic", "--world-size", "8", "--rank", "2"]), env)
    with pytest.raises(ConfigError, match="outside"):
        distributed.placement(parse_config(["--backend", "synthetic", "--rank", "2"]), {})


def test_docs_flags_table_is_current():
    table = markdown_table()
    assert "--dali-hw-decoder-load" in table and "--host-start-method" in table
    docs = (Path(__file__).resolve().parent.parent / "docs" / "training.md").read_text()
    assert table in docs, "regenerate the table: python -m trainlib.config"


@pytest.mark.parametrize("recipe", sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_the_recipes_in_the_repo_are_valid_config_files(recipe):
    """Each key reaches its flag (an unknown key would exit 2) and every value survives validation."""
    import yaml

    cfg = parse_config(["--backend", "synthetic", "-c", str(recipe)])
    assert cfg.config == str(recipe)
    for key, value in yaml.safe_load(recipe.read_text()).items():
        field = {"smoothing": "label_smoothing"}.get(key, key)
        assert getattr(cfg, field) == (pytest.approx(value) if isinstance(value, float) else value), key
    assert parse_config(["--backend", "synthetic", "-c", str(recipe), "--epochs", "3"]).epochs == 3


def test_train_py_refuses_non_finite_floats_before_a_run_folder(tmp_path):
    """--lr inf would train (and diverge at step 2) and --lr nan end in a traceback: both are refused as the flags
    are read, from the command line or a -c file, in two lines, and no run folder is made."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    (tmp_path / "r.yaml").write_text("lr: .inf\n")
    tiny = ["--backend", "synthetic", "--model", "test_vit", "--img-size", "32", "--device", "cpu", "--batch-size",
            "2", "--steps-per-epoch", "2", "--epochs", "1", "--eval-freq", "0", "--no-plots"]
    cases = [(["--lr", "inf"], "argument --lr/--learning-rate: takes a finite number, got 'inf'"),
             (["--lr", "nan"], "argument --lr/--learning-rate: takes a finite number, got 'nan'"),
             (["--warmup-epochs=1e999"], "argument --warmup-epochs: takes a finite number, got '1e999'"),
             (["-c", str(tmp_path / "r.yaml")], f"--config {tmp_path / 'r.yaml'}: lr takes a finite number, got inf")]
    procs = [(error, tmp_path / f"run{i}", subprocess.Popen(
        [sys.executable, "train.py", *tiny, "--output", str(tmp_path / f"run{i}"), *argv], cwd=root,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)) for i, (argv, error) in enumerate(cases)]
    for error, output, proc in procs:
        out, err = proc.communicate(timeout=120)
        assert (proc.returncode, err.splitlines()) == \
            (2, ["usage: train.py [-h] [options]", f"train.py: error: {error}"])
        assert not output.exists()


def test_a_host_run_says_when_workers_outnumber_the_epochs_batches_or_the_cores(sample_shards, tmp_path):
    """--workers 1000 on 48 train samples in batches of 16: 3 decode processes start (one per batch of the epoch), on
    one core (the run is pinned to one): the log says both in one line, and the run trains."""
    import os
    import subprocess
    import sys

    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("pins the run to one core: Linux only")
    root = Path(__file__).resolve().parent.parent
    one_core = min(os.sched_getaffinity(0))
    proc = subprocess.run(
        [sys.executable, "train.py", "--model", "test_vit", "--img-size", "32", "--device", "cpu", "--data_path",
         str(sample_shards), "--batch-size", "16", "--epochs", "1", "--max-steps", "1", "--workers", "1000",
         "--check-shards", "sizes", "--no-plots", "--eval-freq", "0", "--output", str(tmp_path / "run")], cwd=root,
        capture_output=True, text=True, timeout=300, preexec_fn=lambda: os.sched_setaffinity(0, {one_core}))
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = [line for line in (proc.stdout + proc.stderr).splitlines() if "--workers 1000" in line]
    assert said == ["host: --workers 1000: 3 decode processes started, one per batch of an epoch of 3 (more would get "
                    "no batch); 3 processes on 1 core take turns: those beyond the cores add memory, not speed"]
