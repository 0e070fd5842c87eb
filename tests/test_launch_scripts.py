"""tools/train_*.sh: the ModelZoo-style launch scripts take --data_path=, pass other flags to train.py, and end with
the lines ModelZoo tooling greps."""
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model", "test_vit", "--img-size", "32", "--device", "cpu", "--workers", "1", "--batch-size", "4",
        "--warmup-log-steps", "2", "-p", "2"]


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def launch(script, tmp_path, *args, **env):
    env = {**os.environ, "PYTHON": sys.executable, "OUTPUT_DIR": str(tmp_path / "run"), **env}
    return subprocess.run(["bash", str(ROOT / "tools" / script), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


def test_performance_1p_ends_with_the_fps_line(sample_shards, tmp_path):
    proc = launch("train_performance_1p.sh", tmp_path, f"--data_path={sample_shards}", *TINY, "--max-steps", "8")
    assert proc.returncode == 0, proc.stderr[-2000:]
    fps = re.search(r"^Final Performance images/sec : ([0-9.]+)$", proc.stdout, re.M)
    assert fps and float(fps.group(1)) > 0
    assert (tmp_path / "run" / "train.log").is_file()


def test_full_run_under_torchrun_ends_with_fps_and_accuracy(sample_shards, tmp_path):
    proc = launch("train_full_8p.sh", tmp_path, f"--data_path={sample_shards}", *TINY, "--epochs", "1",
                  NPROC="1", MASTER_PORT=free_port())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"^Final Performance images/sec : [0-9.]+$", proc.stdout, re.M)
    assert re.search(r"^Final Accuracy : [0-9.]+$", proc.stdout, re.M)


def test_missing_data_path_is_a_usage_error(tmp_path):
    proc = launch("train_performance_8p.sh", tmp_path, "--device", "cpu")
    assert proc.returncode == 2 and "usage:" in proc.stderr
