"""`sd-zoo eval`: top-1 / top-5 error of a model on a CIFAR split, and the evaluation functions behind it.

Predictions come from a callable ``logits_fn(images) -> logits``: ``images`` is a uint8 tensor
[B, 32, 32, 3] (HWC, RGB, not normalised) and the logits [B, C] a torch tensor or numpy array. The
same :func:`evaluate` therefore scores a PyTorch model (:func:`model_logits_fn`), an ONNX file
(``sd_zoo.onnx_runtime.OnnxClassifier(path)``, which must follow that contract) or anything else.

Weights come from a local safetensors file written by ``sd-zoo train`` (``sd_zoo.checkpoint`` rebuilds
the model from its metadata, with the stochastic-depth settings it was trained with) or from timm's
pretrained tags.
"""
import argparse
import importlib.util
import json
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from . import data
from .checkpoint import load_weights, read_metadata
from .errors import ConfigError

LogitsFn = Callable[[torch.Tensor], object]


def model_logits_fn(model: torch.nn.Module, mean: Sequence[float], std: Sequence[float],
                    channels_last: bool = False, amp: bool = False) -> LogitsFn:
    """Eval-mode logits of a PyTorch model for uint8 HWC batches, normalised on the model's device."""
    device = next(model.parameters()).device
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    @torch.no_grad()
    def logits_fn(images: torch.Tensor) -> torch.Tensor:
        model.eval()
        x = data.normalize(torch.as_tensor(images).to(device), mean, std).contiguous(memory_format=memory_format)
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
        logits = logits_fn(images[chunk])
        logits = logits if torch.is_tensor(logits) else torch.from_numpy(np.asarray(logits))
        y = labels[chunk].to(logits.device)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == y[:, None]
        counts += torch.tensor([hits[:, 0].sum().item(), hits.any(1).sum().item(), len(y)], dtype=torch.float64)
    if world_size > 1:
        on = torch.device('cuda', torch.cuda.current_device()) if dist.get_backend() == 'nccl' else 'cpu'
        counts = counts.to(on)
        dist.all_reduce(counts)
        counts = counts.cpu()
    top1, top5, n = counts.tolist()
    return dict(top1_err=100 * (1 - top1 / n), top5_err=100 * (1 - top5 / n), n=int(n))


def evaluate_model(model: torch.nn.Module, data_name: str, split: str = 'test', batch_size: int = 1000,
                   limit: Optional[int] = None, mean: Optional[Sequence[float]] = None,
                   std: Optional[Sequence[float]] = None, root=None) -> Dict[str, float]:
    """Top-1 / top-5 error of ``model`` on a dataset split (``limit`` images, class-balanced, if given).

    Normalisation defaults to the dataset's statistics; pass the training statistics when they differ.
    """
    info = data.dataset_info(data_name)
    images, labels = load_eval_split(data_name, split, limit, root)
    fn = model_logits_fn(model, mean or info.mean, std or info.std)
    return evaluate(fn, images, labels, batch_size)


def load_eval_split(data_name: str, split: str, limit: Optional[int] = None, root=None):
    """A split, or its first ``limit`` images class by class (the JPEG copies are stored sorted by class)."""
    images, labels = data.load_split(data_name, split, root)
    if limit:
        keep = data.balanced_subset(labels, np.arange(len(labels)), limit)
        images, labels = images[keep], labels[keep]
    return images, labels


def _load_onnx(path: str, device: str) -> LogitsFn:
    if importlib.util.find_spec('sd_zoo.onnx_runtime') is None:
        raise ConfigError('--onnx needs sd_zoo.onnx_runtime, which this installation does not have')
    from .onnx_runtime import OnnxClassifier
    return OnnxClassifier(path, provider='cuda' if device.startswith('cuda') else 'cpu')


def _build(args) -> Tuple[LogitsFn, str, int]:
    """The logits function, the model's display name and its number of classes."""
    if args.onnx:
        fn = _load_onnx(args.onnx, args.device)
        return fn, args.model or Path(args.onnx).stem, getattr(fn, 'num_classes', None) or data.num_classes(args.data)
    if args.checkpoint:
        model = load_weights(args.checkpoint, args.model)
        metadata = read_metadata(args.checkpoint)
        # Normalise as in training: with the statistics of the dataset the weights were trained on.
        trained_on = metadata.get('data')
        info = data.dataset_info(trained_on if trained_on in data.DATASETS else args.data)
        mean, std = info.mean, info.std
        name = args.model or metadata['model']
    else:
        import timm
        if not args.model:
            raise ConfigError('give --model NAME[.TAG] (pretrained weights) or --checkpoint FILE')
        model = timm.create_model(args.model, pretrained=True)
        mean, std = model.pretrained_cfg['mean'], model.pretrained_cfg['std']
        name = args.model
    model.to(args.device)
    return model_logits_fn(model, mean, std), name, model.num_classes


def run(args: argparse.Namespace) -> int:
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    logits_fn, name, model_classes = _build(args)
    if model_classes != data.num_classes(args.data):
        raise ConfigError(f'{name} has {model_classes} classes but {args.data} has {data.num_classes(args.data)}')
    images, labels = load_eval_split(args.data, args.split, args.limit)
    result = evaluate(logits_fn, images, labels, args.batch_size)
    title = data.dataset_info(args.data).title
    print(f'{name} on {title} {args.split} ({result["n"]} images): '
          f'top-1 error {result["top1_err"]:.2f}%, top-5 error {result["top5_err"]:.2f}%')
    if args.json:
        print(json.dumps(dict(result, model=name, data=args.data, split=args.split)))
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        'eval', help='top-1/top-5 error of a model on a CIFAR split', description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', help='timm name, e.g. sd_resnet110.c10j75 (pretrained tag); optional with --checkpoint')
    p.add_argument('--checkpoint', help='safetensors file written by sd-zoo train (final/best.safetensors)')
    p.add_argument('--onnx', help='ONNX file, run through sd_zoo.onnx_runtime')
    p.add_argument('--data', required=True, choices=list(data.DATASETS))
    p.add_argument('--split', default='test', choices=('test', 'train'))
    p.add_argument('--batch-size', type=int, default=1000)
    p.add_argument('--limit', type=int, metavar='N', help='score only the first N images, class-balanced')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--num-threads', type=int, help='torch CPU threads (default: torch decides)')
    p.add_argument('--json', action='store_true', help='print one JSON object last (top1_err, top5_err, n, ...)')
    p.set_defaults(func=run)
