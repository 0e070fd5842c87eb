"""Benchmarks of the input side, apart from the runtime modules: `python -m pipeline.bench` (`throughput.py`: images
per second a backend delivers to the device), the torchvision reference it is compared with (`baseline.py`), what a
mid-epoch resume costs (`resume.py`, behind tools/bench_resume.py) and the /proc readings both use (`memory.py`: a
process tree's CPU seconds and memory)."""
from __future__ import annotations


def endless(loader, stride: int = 1):
    """Batches from epoch 0, stride, 2*stride, ... back to back: for benchmarks that run by the clock, not by epochs.
    A stride above 1 makes every epoch a jump, which a loader cannot run on into."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += stride
