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
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .. import data
from ..errors import ConfigError
from ..models.tags import normalization

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


def count_params_macs(model: nn.Module, input_size=(3, 32, 32)) -> Tuple[int, int]:
    """Parameters and multiply-accumulates of one eval-mode forward (every block runs at test time)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, *input_size))
    model.train(was_training)
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops() // 2  # 1 MAC = 2 FLOPs


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


def check_num_classes(name: str, num_classes: int, data_name: str) -> None:
    """ConfigError when a model's class count differs from the data's."""
    if num_classes != data.num_classes(data_name):
        raise ConfigError(f'{name} has {num_classes} classes but {data_name} has {data.num_classes(data_name)}; '
                          f'give the data the model was trained for')


def check_model_fits(model: torch.nn.Module, data_name: str) -> None:
    """:func:`check_num_classes` of a model, named by its architecture."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    check_num_classes(cfg.get('architecture', type(model).__name__), model.num_classes, data_name)
