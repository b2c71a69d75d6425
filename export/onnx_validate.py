#!/usr/bin/env python3
"""Score an exported ONNX file on a CIFAR split with ONNX Runtime, from a checkout.

    python export/onnx_validate.py sd_resnet110.onnx --data cifar10-jpeg75 --checkpoint final.safetensors

The same command as ``sd-zoo validate``; the implementation is sd_zoo/deploy/onnx_validate.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from sd_zoo.cli import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main(['validate', *sys.argv[1:]]))
