#!/usr/bin/env bash
# Replace Pillow with Pillow-SIMD (same API, SIMD resampling: ~1.5x the host backend's decode path on one core, measured)
# in the Python environment of $PYTHON (default: the active `python`). Needs a C compiler and root for apt-get.
#
#   tools/install_pillow_simd.sh                # into the active environment
#   PYTHON=.venv/bin/python tools/install_pillow_simd.sh
#
# Pillow-SIMD ships only as source, and a later `pip install pillow` (or any package that pulls Pillow in) silently
# puts stock Pillow back: check with `python -m pipeline.bench --data_path SHARDS --decode-only --seconds 3`, whose
# "pillow" field names the flavour. Undo: `pip uninstall -y pillow-simd && pip install pillow`.
set -euo pipefail

PYTHON=${PYTHON:-python}
VERSION=${PILLOW_SIMD_VERSION:-12.1.1.post0}  # `pip index versions pillow-simd` lists the current ones
# -mavx2 lets the SIMD paths use AVX2; every x86-64 server CPU of the last decade has it. Use "cc" alone elsewhere.
SIMD_CC=${SIMD_CC:-"cc -mavx2"}

if command -v apt-get >/dev/null; then
    # libjpeg-turbo's headers: Pillow-SIMD then links the fast JPEG codec; zlib for PNG.
    SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq libjpeg62-turbo-dev zlib1g-dev
fi

"$PYTHON" -m pip uninstall -y pillow pillow-simd
# --no-binary forces a source build even if a wheel ever appears; --no-cache-dir so an old build is not reused.
CC="$SIMD_CC" "$PYTHON" -m pip install --no-cache-dir --no-binary pillow-simd "pillow-simd==$VERSION"

"$PYTHON" - <<'EOF'
import PIL
from PIL import features
assert ".post" in PIL.__version__, f"expected a Pillow-SIMD version, got {PIL.__version__}"
assert features.check_feature("libjpeg_turbo"), "Pillow-SIMD was built without libjpeg-turbo"
print(f"Pillow-SIMD {PIL.__version__}, libjpeg-turbo {features.version_feature('libjpeg_turbo')}")
EOF
