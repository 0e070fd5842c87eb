#!/usr/bin/env bash
# Create .venv (if absent) and install this checkout into it, editable, with everything the demo, the tests and the
# benchmarks need (pyproject.toml: requirements.txt + the dev and dali extras). Afterwards `import pipeline` works
# from any directory in that environment, and so do the scripts in tools/.
# Where a C compiler is, that builds the one-pass pixel and augmentation kernels (pipeline/_pixels.c, _augment.c),
# with libjpeg's headers also the host workers' region decoder, and Pillow-SIMD replaces Pillow
# (tools/install_pillow_simd.sh; a line says so when it cannot be built, and PILLOW_SIMD=0 skips the try).
# Usage: bash tools/setup.sh        (from anywhere; PYTHON=python3.12 to pick an interpreter)
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^set -/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
"$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "setup: Python >= 3.10 needed, $py is $("$py" -V 2>&1)" >&2; exit 2; }
[ -x .venv/bin/python ] || "$py" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# setuptools warns on every editable install that local folders may shadow the package: here they are the package.
PYTHONWARNINGS=ignore .venv/bin/python -m pip install -q -e ".[dev,dali]"
# Pillow-SIMD where it builds (the host workers' resizes run several times faster); PILLOW_SIMD=0 keeps Pillow.
if [ "${PILLOW_SIMD:-1}" != 0 ]; then
    PYTHON=.venv/bin/python bash tools/install_pillow_simd.sh >/dev/null ||
        echo "setup: keeping Pillow (the host backend works with it, slower); PILLOW_SIMD=0 skips this try" >&2
fi
.venv/bin/python - <<'PY'
import importlib.util, torch, torchvision, timm
from pipeline.host import pillow_flavour
from pipeline.shards.jpeg import default_decoder
pixels = "built" if importlib.util.find_spec("pipeline._pixels") else "not built"
augment = "built" if importlib.util.find_spec("pipeline._augment") else "not built"
try:
    import nvidia.dali as dali; d = dali.__version__
except ImportError:
    d = "not installed (the dali backend is unavailable)"
print(f"setup: torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, "
      f"{pillow_flavour()}, host decoder {default_decoder()}, pixel kernels {pixels}, "
      f"augmentation kernels {augment}, DALI {d}")
PY
