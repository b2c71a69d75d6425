#!/usr/bin/env python3
"""Export an sd-zoo model's expected-value network to ONNX, from a checkout (as timm's onnx_export.py).

    python export/onnx_export.py --model sd_resnet110 --checkpoint final.safetensors -o sd_resnet110.onnx

The same command as ``sd-zoo export``; the implementation is sd_zoo/deploy/onnx_export.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from sd_zoo.cli import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main(['export', *sys.argv[1:]]))
