"""`python -m pipeline.bench`: pipeline/bench/throughput.py says what it measures and how to read it."""
import sys

from pipeline.bench.throughput import main

sys.exit(main())
