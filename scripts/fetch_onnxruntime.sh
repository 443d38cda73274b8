#!/bin/sh
# Fetch libonnxruntime from the pinned official PyPI wheel, check its sha256, and extract the shared
# library into .cache/onnxruntime/. Idempotent: does nothing when the library is already there.
# Used by `make setup` and by deploy/Dockerfile (one source of truth: scripts/pins.env).
set -eu
root=$(CDPATH= cd -- "$(dirname -- "$0")/.." && pwd)
. "$root/scripts/pins.env"
cache="${STREAMGATE_CACHE:-$root/.cache}"
lib="$cache/onnxruntime/libonnxruntime.so.$ORT_VERSION"
[ -f "$lib" ] && exit 0

mkdir -p "$cache/downloads" "$cache/onnxruntime"
wheel="$cache/downloads/$ORT_WHEEL"
if [ ! -f "$wheel" ]; then
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux_2_28_x86_64 "onnxruntime==$ORT_VERSION" -d "$cache/downloads"
fi
echo "$ORT_WHEEL_SHA256  $wheel" | sha256sum -c --quiet - || {
  echo "sha256 mismatch for $wheel (expected $ORT_WHEEL_SHA256); deleting it" >&2
  rm -f "$wheel"; exit 1; }
python3 - "$wheel" "$lib" "$ORT_VERSION" <<'PY'
import shutil, sys, zipfile
wheel, dest, version = sys.argv[1:]
member = f"onnxruntime/capi/libonnxruntime.so.{version}"
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dest + ".part", "wb") as out:
    shutil.copyfileobj(src, out)
PY
mv "$lib.part" "$lib"
echo "ONNX Runtime $ORT_VERSION -> $lib"
