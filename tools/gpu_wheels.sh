#!/usr/bin/env bash
# Wheels for the lent GPU machine (no registry access there): the CPython 3.12 x86-64 wheels of what
# its image lacks, downloaded here into a git-ignored folder, then carried with `run(carry=[".wheels"])`.
#
#   tools/gpu_wheels.sh [DEST]      (DEST defaults to .wheels; PYTHON=... picks the interpreter whose
#                                   installed versions are pinned, default .venv/bin/python)
#
# The image already has torch, torchvision, transformers, timm, typer, tqdm, scipy, numpy, pillow, fsspec,
# aiohttp, safetensors, pandas, typing-extensions and packaging. It lacks zarr and its needs (numcodecs,
# donfig, google-crc32c) and the COCO evaluators (pycocotools, faster-coco-eval). Versions are pinned to
# this checkout's venv so both machines run the same code. --no-deps: every wheel is named here.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.wheels}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
PKGS=(zarr numcodecs donfig google-crc32c pycocotools faster-coco-eval)

pins=()
for p in "${PKGS[@]}"; do
  v=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$p" 2>/dev/null) || {
    echo "error: $p is not installed in $PY; install the project (pip install -e .) or set PYTHON" >&2; exit 2; }
  pins+=("$p==$v")
done

mkdir -p "$DEST"
rm -f "$DEST"/*.whl
plats=()
for n in 39 35 34 31 28 27 24 17; do plats+=(--platform "manylinux_2_${n}_x86_64"); done
plats+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --abi abi3 --abi none "${plats[@]}" -d "$DEST" "${pins[@]}"

echo "wheels in $DEST:"
ls -l "$DEST"/*.whl | awk '{printf "  %8.2f MiB  %s\n", $5 / 1048576, $9}'
du -cb "$DEST"/*.whl | tail -1 | awk '{printf "  %8.2f MiB  total (the carry limit is 64 MiB for everything carried)\n", $1 / 1048576}'
cat <<CMD

device command (run(carry=["$DEST"], timeout_s=600)):
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $DEST/*.whl && PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1 python3 benchmarks/gpu_suite.py --out \$OUT --budget 450 2>&1 | tee \$OUT/gpu_suite.log
CMD
