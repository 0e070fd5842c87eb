"""Shared fixtures: a tiny ImageFolder and its shards, made once per test session.

`sample_folder`: 4 classes, 12 train + 4 val images per class, 64-96 px, seed 0.
`sample_shards`: make_shards output of it with 10 samples per shard (train: 5 shards, the last one
short; val: 2 shards). Treat both as read-only; copy them (shutil.copytree) before changing anything.
Tests marked `@pytest.mark.gpu` are skipped when torch sees no CUDA device.
"""
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# tools/ holds scripts, not a package: put its folder on the path so tests can import each script as a module.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import make_sample_data  # noqa: E402
import make_shards  # noqa: E402

SAMPLE_ARGS = ["--classes", "4", "--train-per-class", "12", "--val-per-class", "4", "--seed", "0",
               "--min-side", "64", "--max-side", "96", "--workers", "1"]


def pytest_configure(config):
    # The shard-contents cache of verified copies (pipeline/shards/contents.py) of this session's runs, subprocesses
    # included: apart from the user's own cache, and removed at the end.
    os.environ["VIT_FAST_SHARD_CACHE"] = tempfile.mkdtemp(prefix="vit-fast-test-cache-")
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped when torch.cuda.is_available() is False")


def pytest_unconfigure(config):
    shutil.rmtree(os.environ.pop("VIT_FAST_SHARD_CACHE", ""), ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch  # only paid for when a GPU test was collected

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in gpu_items:
        item.add_marker(skip)


def _run_ok(fn, argv):
    rc = fn(argv)
    if rc != 0:
        raise RuntimeError(f"{fn.__module__} {argv} exited with {rc}")


@pytest.fixture(scope="session")
def sample_folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample") / "imagefolder"
    _run_ok(make_sample_data.main, [str(out), *SAMPLE_ARGS])
    return out


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory, sample_folder) -> Path:
    out = tmp_path_factory.mktemp("shards") / "shards"
    _run_ok(make_shards.main, ["--data_path", str(sample_folder), "--out", str(out),
                                   "--samples-per-shard", "10", "--workers", "1"])
    return out
