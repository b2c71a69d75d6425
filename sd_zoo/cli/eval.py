"""`sd-zoo eval`: its flags, and the model, ONNX file or depth ensemble they name, scored on a split."""
import argparse
import importlib.util
import json
from pathlib import Path
from typing import Tuple

import torch

from .. import data
from ..errors import ConfigError
from ..evaluation import evaluate as evaluate_module
from ..evaluation.evaluate import (
    LogitsFn, check_num_classes, evaluate, load_eval_split, model_logits_fn, resolve_device
)
from ..evaluation.uncertainty import calibration_report, format_report, plot_reliability
from ..files import sha256_file
from ..models.tags import normalization
from ..ranges import COUNT, NON_NEGATIVE
from ..weights.loader import Provenance, load_named
from .args import add_number


def _load_onnx(path: str, device: str) -> LogitsFn:
    if importlib.util.find_spec('sd_zoo.deploy.onnx_runtime') is None:
        raise ConfigError('--onnx needs sd_zoo.deploy.onnx_runtime, which this installation does not have')
    from ..deploy.onnx_runtime import OnnxClassifier
    return OnnxClassifier(path, provider='cuda' if device.startswith('cuda') else 'cpu')


def eval_model(args) -> Tuple[torch.nn.Module, Provenance]:
    """The PyTorch model of ``--model`` / ``--checkpoint`` on ``--device``, and what its results name it by."""
    if not (args.model or args.checkpoint):
        raise ConfigError('give --model NAME[.TAG] (pretrained weights) or --checkpoint FILE')
    device = resolve_device(args.device)
    model, named = load_named(args.checkpoint, model_name=args.model) if args.checkpoint else load_named(args.model)
    check_num_classes(named.model, model.num_classes, args.data)
    return model.to(device), named


def _build(args) -> Tuple[LogitsFn, Provenance]:
    """The logits function and what its results name the weights by."""
    if args.onnx:
        if args.model or args.checkpoint:
            raise ConfigError('--onnx scores the ONNX file alone: drop --model and --checkpoint (to compare it '
                              'with PyTorch weights, run sd-zoo validate FILE.onnx --checkpoint ...)')
        fn = _load_onnx(args.onnx, str(resolve_device(args.device)))
        check_num_classes(args.onnx, getattr(fn, 'num_classes', None) or data.num_classes(args.data), args.data)
        return fn, Provenance(Path(args.onnx).stem, args.onnx, sha256_file(args.onnx))
    model, named = eval_model(args)
    return model_logits_fn(model, *normalization(model)), named


def run_mc_eval(args) -> int:
    """``sd-zoo eval --mc-samples N``: the calibration report of a PyTorch model on the test split."""
    if args.onnx:
        raise ConfigError('--mc-samples samples depths of the PyTorch model, and an ONNX file holds only the '
                          'deterministic expected-value net; pass --model or --checkpoint instead of --onnx')
    if args.split != 'test':
        raise ConfigError('--mc-samples measures on the test split (the temperature is fitted on the validation '
                          'part of the training split); drop --split train')
    model, named = eval_model(args)
    generator = torch.Generator().manual_seed(args.seed)
    report = calibration_report(model, args.data, args.mc_samples, *normalization(model), limit=args.limit or None,
                                batch_size=args.batch_size, generator=generator)
    title = f'{named} on {data.dataset_info(args.data).title} test ({report["n"]} images)'
    print(format_report(report, title))
    if args.plot:
        print(f'reliability diagrams: {plot_reliability(report, args.plot, title)}')
    if args.json:
        print(json.dumps(dict({k: v for k, v in report.items() if k != 'reliability'}, **named.fields(),
                              data=args.data)))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    if args.mc_samples is not None:  # depth sampling needs the PyTorch model itself, not a logits function
        return run_mc_eval(args)
    if args.plot:
        raise ConfigError('--plot draws the reliability diagrams of --mc-samples N; add --mc-samples')
    logits_fn, named = _build(args)
    images, labels = load_eval_split(args.data, args.split, args.limit)
    result = evaluate(logits_fn, images, labels, args.batch_size)
    print(f'{named} on {data.dataset_info(args.data).title} {args.split} ({result["n"]} images): '
          f'top-1 error {result["top1_err"]:.2f}%, top-5 error {result["top5_err"]:.2f}%')
    if args.json:
        print(json.dumps(dict(result, **named.fields(), data=args.data, split=args.split)))
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        'eval', help='top-1/top-5 error of a model on a CIFAR split', description=evaluate_module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', help='timm name, e.g. sd_resnet110.c10j75 (pretrained tag); optional with --checkpoint')
    p.add_argument('--checkpoint', help='safetensors file written by sd-zoo train (final/best.safetensors)')
    p.add_argument('--onnx', help='ONNX file, run through sd_zoo.deploy.onnx_runtime')
    p.add_argument('--data', required=True, choices=list(data.DATASETS))
    p.add_argument('--split', default='test', choices=('test', 'train'))
    add_number(p, '--batch-size', bound=COUNT, default=1000)
    add_number(p, '--limit', bound=NON_NEGATIVE, metavar='N', help='score only the first N images, class-balanced')
    p.add_argument('--device', help='cpu, cuda or cuda:N (default: cuda if available)')
    add_number(p, '--num-threads', bound=COUNT, help='torch CPU threads (default: torch decides)')
    p.add_argument('--json', action='store_true', help='print one JSON object last (top1_err, top5_err, n, ...)')
    g = p.add_argument_group('uncertainty from depth (sd_zoo.evaluation.uncertainty)')
    add_number(g, '--mc-samples', bound=COUNT, metavar='N',
               help='calibration of the expected-value net, of it temperature-scaled (T fitted on the validation '
                    'images held out of training; --limit caps them too) and of an N-sample depth ensemble')
    g.add_argument('--plot', metavar='FILE', help='with --mc-samples: reliability diagrams side by side (PNG)')
    add_number(g, '--seed', bound=NON_NEGATIVE, default=0, help='seed of the depth samples (default 0)')
    p.set_defaults(func=run)
