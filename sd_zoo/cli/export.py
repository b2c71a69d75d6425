"""`sd-zoo export`: its flags, and the ONNX export (fp32, fp16, int8, depth-pruned) they ask for."""
import argparse
import json
from dataclasses import asdict
from functools import partial
from typing import Union

from ..deploy import onnx_export
from ..deploy.onnx_export import EXPORTERS, MIN_OPSET, export_onnx
from ..deploy.quantize import CALIBRATION_IMAGES, DEFAULT_WEIGHT_BITS, WEIGHT_BITS, export_int8
from ..errors import ConfigError
from ..ranges import COUNT, Bound
from .args import add_model_arguments, add_number, model_args_of, parse_order


def parse_batch(value: str) -> Union[str, int]:
    """'dynamic' or a whole number (whose range the flag's bound checks)."""
    if value == 'dynamic':
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected "dynamic" or a positive batch size, got {value!r}') from None


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        'export', help='export the expected-value network to ONNX', description=onnx_export.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', help='registered name, optionally with a tag: sd_resnet110, sd_resnet110.c10j75 '
                                   '(optional with --checkpoint, whose metadata names it)')
    src = p.add_mutually_exclusive_group()
    src.add_argument('--pretrained', action='store_true', help="load the tag's published weights")
    src.add_argument('--checkpoint', help='safetensors file written by sd-zoo (its sd settings are folded)')
    p.add_argument('-o', '--output', required=True, help='the .onnx file to write')
    add_number(p, '--opset', bound=COUNT, default=MIN_OPSET, help=f'ONNX opset (>= {MIN_OPSET}; default %(default)s)')
    p.add_argument('--fp16', action='store_true', help='float16 weights and compute, float32 input and output')
    add_number(p, '--batch', bound=COUNT, type=parse_batch, default='dynamic',
               help='"dynamic" (default) or a fixed batch size')
    add_model_arguments(p)
    p.add_argument('--exporter', choices=EXPORTERS, default='auto',
                   help='torch.onnx path: dynamo (default, TorchScript if it fails) or torchscript')
    p.add_argument('--json', action='store_true', help='print the export report as one JSON object last')
    g = p.add_argument_group('deployment dials')
    add_number(g, '--keep-blocks', bound=COUNT, metavar='N', help='depth-prune to N residual blocks (>= 1 per stage)')
    g.add_argument('--prune-order', type=parse_order, default='survival', metavar='ORDER',
                   help='blocks dropped first: survival (lowest p_l, default), importance (validation images of '
                        'the training data), or block indices i,j,...')
    g.add_argument('--int8', action='store_true', help='int8 static quantization (QDQ, per-channel weights)')
    g.add_argument('--calibration', metavar='DATA', help='training data for --int8 calibration and the importance '
                                                         'order (default for importance: what the weights saw)')
    add_number(g, '--calibration-images', bound=COUNT, metavar='N',
               help=f'training images that calibrate --int8 (default {CALIBRATION_IMAGES})')
    add_number(g, '--int8-weight-bits', bound=Bound(min(WEIGHT_BITS), max(WEIGHT_BITS)), metavar='{7,8}',
               help=f'range of the int8 weights (default {DEFAULT_WEIGHT_BITS}): 7 runs exactly and fast on every '
                    'x86 CPU; 8 is for CPUs with VNNI and ARM (x86 CPUs without VNNI saturate it unless ONNX '
                    'Runtime\'s session.x64quantprecision is set)')
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    int8_only = [flag for flag, value in (('--calibration-images', args.calibration_images),
                                          ('--int8-weight-bits', args.int8_weight_bits)) if value is not None]
    if int8_only and not args.int8:
        raise ConfigError(f'{" and ".join(int8_only)} {"apply" if len(int8_only) > 1 else "applies"} to int8 '
                          f'quantization only: add --int8')
    export = partial(
        export_onnx, args.model, pretrained=args.pretrained, checkpoint=args.checkpoint,
        model_args=model_args_of(args), opset=args.opset, fp16=args.fp16, batch=args.batch, exporter=args.exporter,
        keep_blocks=args.keep_blocks, prune_order=args.prune_order, prune_data=args.calibration)
    if args.int8:
        report, int8 = export_int8(export, args.output, args.calibration, args.calibration_images or CALIBRATION_IMAGES,
                                   fp16=args.fp16, weight_bits=args.int8_weight_bits or DEFAULT_WEIGHT_BITS)
    else:
        report, int8 = export(args.output), None
    print(report.summary())
    result = asdict(report)
    if int8 is not None:
        print(int8.summary())
        result['int8'] = int8.to_dict()
    if args.json:
        print(json.dumps(result))
    return 0
