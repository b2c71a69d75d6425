#!/usr/bin/env bash
# Prepare the GPU run on the development machine: fill the ignored folder .lease/ with what travels to the
# GPU machine besides the checkout (which has no network there):
#   .lease/data/    the two CIFAR JPEG-75 archives (39 MB; their decoded cache is 185 MB each and stays here)
#   .lease/wheels/  pure-Python wheels of timm (this environment's version), tqdm, onnxscript and onnx-ir,
#                   installed there only when the machine's own copy is missing or too old
# Then the whole run is one call:  bash benchmarks/gpu_lease.sh  with .lease carried and a 570 s timeout.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
DATA=${SD_ZOO_DATA:-../shared/data}
mkdir -p .lease/data .lease/wheels

for name in cifar10-jpeg75 cifar100-jpeg75; do
    cp -f "$DATA/$name.tar.gz" .lease/data/
done
# The same digests data.py checks before decoding.
"$PYTHON" - <<'EOF'
from pathlib import Path
from sd_zoo import data
for name in ('cifar10-jpeg75', 'cifar100-jpeg75'):
    info = data.dataset_info(name)
    data.verify_archive(Path('.lease/data') / info.source, info.sha256)
    print(f'{name}: sha256 ok')
EOF

version() { "$PYTHON" -c "import importlib.metadata as m; print(m.version('$1'))"; }
rm -f .lease/wheels/*.whl
for pkg in timm tqdm onnxscript onnx-ir; do
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest .lease/wheels "$pkg==$(version "$pkg")"
done

ls -l .lease/data .lease/wheels
du -sh .lease
echo 'ready: copy the checkout with .lease/ to the GPU machine and run  OUT=<folder> bash benchmarks/gpu_lease.sh  (timeout 570 s)'
