"""`sd-zoo eval`: top-1 / top-5 error of a model on a CIFAR split, and the evaluation functions behind it.

Predictions come from a callable ``logits_fn(images) -> logits``: ``images`` is a uint8 tensor
[B, 32, 32, 3] (HWC, RGB, not normalised) and the logits [B, C] a torch tensor or numpy array. The
same :func:`evaluate` therefore scores a PyTorch model (:func:`model_logits_fn`), an ONNX file
(``sd_zoo.deploy.onnx_runtime.OnnxClassifier(path)``, which must follow that contract) or anything else.

Models come from :func:`sd_zoo.load_model`: a pretrained tag, a Hub folder, or a safetensors file
written by ``sd-zoo train``, each rebuilt with the settings and normalisation it was trained with. The
result names the weights it came from (``sd_zoo.weights.loader.Provenance``): a file by its path and sha256, a
published tag's name only for the published weights of that tag.
"""
import argparse
import importlib.util
import json
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from .. import data
from ..cli.args import COUNT, NON_NEGATIVE, add_number
from ..errors import ConfigError
from ..files import sha256_file
from ..weights.loader import Provenance, load_named

LogitsFn = Callable[[torch.Tensor], object]


def model_logits_fn(model: torch.nn.Module, mean: Sequence[float], std: Sequence[float],
                    channels_last: bool = False, amp: bool = False) -> LogitsFn:
    """Eval-mode logits of a PyTorch model for uint8 HWC batches, normalised on the model's device."""
    device = next(model.parameters()).device
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    what = f'the logits function of {(getattr(model, "pretrained_cfg", None) or {}).get("architecture", "a model")}'

    @torch.no_grad()
    def logits_fn(images: torch.Tensor) -> torch.Tensor:
        model.eval()
        x = data.normalize(torch.as_tensor(images).to(device), mean, std, what).contiguous(memory_format=memory_format)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            return model(x).float()
    return logits_fn


def evaluate(logits_fn: LogitsFn, images, labels, batch_size: int = 1000,
             rank: int = 0, world_size: int = 1) -> Dict[str, float]:
    """Top-1 / top-5 error (percent) and image count of ``logits_fn`` on uint8 images [N, 32, 32, 3].

    Under DDP each rank scores its contiguous share and the counts are summed over ranks.
    """
    images, labels = torch.as_tensor(images), torch.as_tensor(labels)
    share = torch.arange(len(labels)).tensor_split(world_size)[rank]
    counts = torch.zeros(3, dtype=torch.float64)  # top-1 correct, top-5 correct, images
    for chunk in share.split(batch_size):
        logits = torch.as_tensor(logits_fn(images[chunk]))
        y = labels[chunk].to(logits.device)
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]
        counts += torch.tensor([hits[:, 0].sum().item(), hits.any(1).sum().item(), len(y)], dtype=torch.float64)
    if world_size > 1:
        on = torch.device('cuda', torch.cuda.current_device()) if dist.get_backend() == 'nccl' else 'cpu'
        counts = counts.to(on)
        dist.all_reduce(counts)
        counts = counts.cpu()
    top1, top5, n = counts.tolist()
    return dict(top1_err=100 * (1 - top1 / n), top5_err=100 * (1 - top5 / n), n=int(n))


def evaluate_model(model: torch.nn.Module, data_name: str, split: str = 'test', batch_size: int = 1000,
                   limit: Optional[int] = None, root=None) -> Dict[str, float]:
    """Top-1 / top-5 error of ``model`` on a dataset split (``limit`` images, class-balanced, if given),
    inputs normalised as its weights expect (:func:`normalization`)."""
    check_model_fits(model, data_name)
    images, labels = load_eval_split(data_name, split, limit, root)
    return evaluate(model_logits_fn(model, *normalization(model)), images, labels, batch_size)


def normalization(model: torch.nn.Module) -> Tuple[Sequence[float], Sequence[float]]:
    """(mean, std) the model's weights expect: its ``pretrained_cfg``'s, which :func:`sd_zoo.load_model` sets."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return tuple(cfg.get('mean', data.CIFAR10_MEAN)), tuple(cfg.get('std', data.CIFAR10_STD))


def resolve_device(name: Optional[str]) -> torch.device:
    """``torch.device(name)`` (default: cuda if available), or a ConfigError for one this machine lacks."""
    if not name:
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f'unknown device {name!r}; use cpu, cuda or cuda:N') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ConfigError(f'--device {name}: this machine has no CUDA GPU (or torch was built without CUDA); '
                          f'use --device cpu')
    if device.type == 'cuda' and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f'--device {name}: only {torch.cuda.device_count()} CUDA device(s) here')
    if device.type not in ('cpu', 'cuda'):
        raise ConfigError(f'--device {name}: sd-zoo runs on cpu or cuda')
    return device


def load_eval_split(data_name: str, split: str, limit: Optional[int] = None, root=None):
    """A split, or its first ``limit`` images class by class (the JPEG copies are stored sorted by class)."""
    images, labels = data.load_split(data_name, split, root)
    if limit:
        keep = data.balanced_subset(labels, np.arange(len(labels)), limit)
        images, labels = images[keep], labels[keep]
    return images, labels


def _load_onnx(path: str, device: str) -> LogitsFn:
    if importlib.util.find_spec('sd_zoo.deploy.onnx_runtime') is None:
        raise ConfigError('--onnx needs sd_zoo.deploy.onnx_runtime, which this installation does not have')
    from ..deploy.onnx_runtime import OnnxClassifier
    return OnnxClassifier(path, provider='cuda' if device.startswith('cuda') else 'cpu')


def check_num_classes(name: str, num_classes: int, data_name: str) -> None:
    """ConfigError when a model's class count differs from the data's."""
    if num_classes != data.num_classes(data_name):
        raise ConfigError(f'{name} has {num_classes} classes but {data_name} has {data.num_classes(data_name)}; '
                          f'give the data the model was trained for')


def check_model_fits(model: torch.nn.Module, data_name: str) -> None:
    """:func:`check_num_classes` of a model, named by its architecture."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    check_num_classes(cfg.get('architecture', type(model).__name__), model.num_classes, data_name)


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


def run(args: argparse.Namespace) -> int:
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    if args.mc_samples is not None:  # depth sampling needs the PyTorch model itself, not a logits function
        from .uncertainty import run_mc_eval
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
        'eval', help='top-1/top-5 error of a model on a CIFAR split', description=__doc__,
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
