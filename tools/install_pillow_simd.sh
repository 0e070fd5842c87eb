#!/usr/bin/env bash
# Replace Pillow with Pillow-SIMD (same API, SIMD resampling: the host workers' resize runs ~3.7x faster, see
# docs/pipeline.md) in the Python environment of $PYTHON (default: the active `python`). tools/setup.sh runs it;
# PILLOW_SIMD=0 there keeps stock Pillow.
#
#   tools/install_pillow_simd.sh                # into the active environment
#   PYTHON=.venv/bin/python tools/install_pillow_simd.sh
#
# Pillow-SIMD ships only as source: it needs a C compiler and libjpeg-turbo's and zlib's headers (Debian/Ubuntu:
# apt-get install libjpeg62-turbo-dev zlib1g-dev). The wheel is built first and cached in $PILLOW_SIMD_CACHE, and
# Pillow is swapped out only once it exists, so a failed build leaves Pillow in place (exit 1, one line). A later
# `pip install` of a package that needs Pillow puts stock Pillow back: rerunning this script swaps again from the
# cache. The flavour in use: `python -m pipeline.bench --data_path SHARDS --decode-only --seconds 3`, field "pillow".
# Undo: `pip uninstall -y pillow-simd && pip install --force-reinstall pillow`.
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^set -/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac

PYTHON=${PYTHON:-python}
VERSION=${PILLOW_SIMD_VERSION:-12.1.1.post0}  # `pip index versions pillow-simd` lists the current ones
CACHE=${PILLOW_SIMD_CACHE:-"$HOME/.cache/vit-fast/pillow-simd"}
# AVX2 where the CPU has it (every x86-64 server CPU of the last decade); the build then runs only on such CPUs.
if grep -qw avx2 /proc/cpuinfo 2>/dev/null; then SIMD_CC=${SIMD_CC:-"cc -mavx2"}; else SIMD_CC=${SIMD_CC:-cc}; fi
tag=$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
dir="$CACHE/$VERSION-$tag-$(echo "$SIMD_CC" | tr -c 'a-z0-9\n' '_')"

if ! ls "$dir"/pillow_simd-*.whl >/dev/null 2>&1; then
    mkdir -p "$dir"
    log=$(mktemp)
    # --no-binary: a source build even if a wheel ever appears.
    if ! CC="$SIMD_CC" "$PYTHON" -m pip wheel -q --no-deps --no-cache-dir --no-binary pillow-simd -w "$dir" \
            "pillow-simd==$VERSION" >"$log" 2>&1; then
        why=$(grep -m1 -iE "error|fatal" "$log" || tail -1 "$log")
        echo "Pillow-SIMD $VERSION did not build (${why:0:160}); needs cc and libjpeg/zlib headers" >&2
        rm -rf "$dir" "$log"
        exit 1
    fi
    rm -f "$log"
fi
"$PYTHON" -m pip uninstall -q -y pillow pillow-simd 2>/dev/null || true
"$PYTHON" -m pip install -q --no-deps "$dir"/pillow_simd-*.whl

"$PYTHON" - <<'EOF'
import PIL
from PIL import features
assert ".post" in PIL.__version__, f"expected a Pillow-SIMD version, got {PIL.__version__}"
jpeg = features.version_feature("libjpeg_turbo") if features.check_feature("libjpeg_turbo") else "not libjpeg-turbo"
print(f"Pillow-SIMD {PIL.__version__} (JPEG: {jpeg})")
EOF
