"""Benchmark code of the training side, apart from the runtime modules: `steps.py`, the steps that
tools/bench_train.py and tools/profile_step.py compare (timm's textbook step, and train.py's own)."""
