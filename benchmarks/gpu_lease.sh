#!/usr/bin/env bash
# The GPU run as one command line (see benchmarks/gpu_lease.py): train sd_resnet110 with and without
# stochastic depth on CIFAR-10 and CIFAR-100 (JPEG-75 copies), time GPU inference, results in $OUT.
#   bash benchmarks/gpu_lease_prepare.sh                      # first, on the development machine
#   bash benchmarks/gpu_lease.sh                              # on the GPU machine, .lease carried, timeout 570 s
#   DRY_RUN=1 OUT=$(mktemp -d) bash benchmarks/gpu_lease.sh   # the whole path on a CPU in a few minutes
# The project is not installed there: the checkout goes on PYTHONPATH. PYTHON overrides the interpreter
# (default: this checkout's .venv if it has one, else the machine's python3).
set -u
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" benchmarks/gpu_lease.py "$@"
