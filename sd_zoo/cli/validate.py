"""`sd-zoo validate`: its flags, and the ONNX file they score against its PyTorch weights or another ONNX file."""
import argparse
import json
from pathlib import Path

from .. import data
from ..deploy import onnx_validate
from ..deploy.onnx_runtime import PROVIDERS, OnnxClassifier
from ..deploy.onnx_validate import format_result, pytorch_reference, validate_onnx
from ..ranges import COUNT, NON_NEGATIVE
from .args import add_number


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        'validate', help='score an ONNX file on a CIFAR split with ONNX Runtime', description=onnx_validate.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('onnx', help='the .onnx file to score')
    p.add_argument('--data', default='cifar10-jpeg75', choices=list(data.DATASETS))
    p.add_argument('--split', default='test', choices=('test', 'train'))
    add_number(p, '--limit', bound=NON_NEGATIVE, help='score only the first N images of the split, class by class')
    add_number(p, '--batch-size', bound=COUNT, default=500)
    p.add_argument('--provider', choices=PROVIDERS, default='cpu')
    ref = p.add_mutually_exclusive_group()
    ref.add_argument('--checkpoint', help='safetensors file the ONNX was exported from: report agreement with it')
    ref.add_argument('--compare', help='another .onnx file (e.g. the fp32 export): report agreement with it')
    p.add_argument('--model', help='architecture[.tag] of the PyTorch reference (with --checkpoint or --pretrained)')
    p.add_argument('--pretrained', action='store_true', help="the reference uses the tag's published weights")
    p.add_argument('--json', action='store_true', help='print one JSON object last')
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    clf = OnnxClassifier(args.onnx, args.provider)
    reference, reference_name = None, None
    if args.compare:
        reference, reference_name = OnnxClassifier(args.compare, args.provider), Path(args.compare).name
    elif args.checkpoint or args.model:
        reference, reference_name = pytorch_reference(clf, args.model, args.checkpoint, args.pretrained)
    result = validate_onnx(clf, args.data, args.split, args.limit, args.batch_size, reference=reference)
    print(format_result(result, reference_name))
    if args.json:
        print(json.dumps(result))
    return 0
