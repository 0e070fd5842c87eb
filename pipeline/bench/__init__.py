"""Benchmarks of the input side, apart from the runtime modules: `python -m pipeline.bench` (`throughput.py`: images
per second a backend delivers to the device) and the torchvision reference it is compared with (`baseline.py`)."""
