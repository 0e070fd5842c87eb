"""pipeline/contract.py: the input-wait timer every timing loop shares, and backend options checked by type."""
from __future__ import annotations

import time

import pytest
import torch

from pipeline import build_loader, timed
from pipeline.host import HostOptions


def test_timed_reports_the_time_blocked_in_next():
    def slow():
        for i in range(3):
            time.sleep(0.05 * i)
            yield i

    out = list(timed(slow()))
    assert [b for b, _ in out] == [0, 1, 2]
    waits = [w for _, w in out]
    assert waits[0] < 0.04 and 0.04 <= waits[1] < 0.5 and 0.09 <= waits[2] < 0.5


def test_host_options_are_checked(sample_shards):
    with pytest.raises(ValueError, match="slots_per_worker must be >= 1"):
        build_loader(data_path=sample_shards, backend="host", batch_size=4, device="cpu",
                     options=HostOptions(slots_per_worker=0))
    with pytest.raises(TypeError, match="a HostOptions, got dict"):
        build_loader(data_path=sample_shards, backend="host", batch_size=4, device="cpu", options={"timeout_s": 1})
    with build_loader(data_path=sample_shards, backend="host", batch_size=4, device="cpu", workers=1, img_size=16,
                      dtype=torch.uint8, options=HostOptions(slots_per_worker=1, start_method="spawn")) as loader:
        assert "1 shm slots" in loader.describe() and "(spawn)" in loader.describe()
        assert sum(len(y) for _, y in loader) == len(loader) * 4


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's malloc is what is tuned")
def test_cpu_float_batches_reuse_freed_memory_instead_of_fresh_pages():
    # A 64 x 224 px float batch is 38.5 MB; without keep_freed_batches_in_the_heap every batch would be new pages
    # that the kernel zero-fills on first touch (~9,400 minor page faults a batch).
    import subprocess
    import sys
    script = """
import resource, sys, torch
from pipeline.contract import LoaderSpec, to_model_input
torch.set_num_threads(1)
spec = LoaderSpec(data_path="x", split="train", batch_size=64, img_size=224, device=torch.device("cpu"),
                  dtype=torch.float32)
pixels = torch.zeros((64, 224, 224, 3), dtype=torch.uint8)
kept = [to_model_input(pixels, spec, nhwc=True)]
for _ in range(20):  # the heap grows to hold the batches alive at once
    kept = kept[-1:] + [to_model_input(pixels, spec, nhwc=True)]
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    kept = kept[-1:] + [to_model_input(pixels, spec, nhwc=True)]  # the consumer holds the last batch
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    faults = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                                cwd=str(__import__("pathlib").Path(__file__).resolve().parent.parent)).stdout)
    assert faults < 9_400, faults  # fresh pages would be 94,000 (measured: 0 once the heap has grown)
