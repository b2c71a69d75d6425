"""Pretrained tags: what each tag means (its data, settings and input statistics), and the timm cfgs built from it.

:data:`TAGS` is the one table of what a pretrained tag means: the data its weights were trained on and
the ``create_model`` arguments they were trained with. The model files register their ``default_cfgs``
from it (one Hub repo per model and tag under :data:`HUB_ORG`); :func:`normalization` gives a model the
mean and std its weights expect.
"""
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

from timm.models import get_pretrained_cfg, list_pretrained
from torch import nn

from ..errors import ConfigError

HUB_ORG = 'sd-zoo'
PAPER_ID = 'arXiv:1603.09382'
PAPER_NAME = 'Deep Networks with Stochastic Depth'
LICENSE = 'apache-2.0'

# Published statistics of the lossless training sets (the JPEG copies are within 0.003 of them).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


@dataclass(frozen=True)
class Tag:
    """What a pretrained tag means."""
    data: str                  # the data the weights were trained on (an sd_zoo.data name where it has one)
    model_args: Dict[str, Any]  # create_model arguments of the weights (the rest are the model's defaults)
    num_classes: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]


SD, CONSTANT = dict(drop_path_rate=0.5), dict(drop_path_rate=0.0)
C10 = dict(num_classes=10, mean=CIFAR10_MEAN, std=CIFAR10_STD)
C100 = dict(num_classes=100, mean=CIFAR100_MEAN, std=CIFAR100_STD)
TAGS: Dict[str, Tag] = {
    'c10j75': Tag('cifar10-jpeg75', SD, **C10),
    'c10j75_cd': Tag('cifar10-jpeg75', CONSTANT, **C10),    # constant-depth baseline of c10j75
    'c100j75': Tag('cifar100-jpeg75', SD, **C100),
    'c100j75_cd': Tag('cifar100-jpeg75', CONSTANT, **C100),
    'c10': Tag('cifar10', SD, **C10),  # the lossless originals: the paper's setting
    'c10_cd': Tag('cifar10', CONSTANT, **C10),
    'c100': Tag('cifar100', SD, **C100),
    'c100_cd': Tag('cifar100', CONSTANT, **C100),
    'svhn': Tag('svhn', SD, 10, (0.5,) * 3, (0.5,) * 3),
    'in1k': Tag('imagenet-1k', SD, 1000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def trainable_tags() -> Tuple[str, ...]:
    """The tags of the CIFAR data ``sd-zoo train`` trains on: every CIFAR architecture is registered with all of
    them, so that any run of the trainer publishes under the tag that means its data and settings."""
    return tuple(t for t, info in TAGS.items() if info.data.startswith('cifar'))


def tag_info(tag: str) -> Tag:
    if tag not in TAGS:
        raise ConfigError(f'unknown pretrained tag {tag!r}; known tags: {", ".join(TAGS)}')
    return TAGS[tag]


def tag_for(data_name: str, model_args: Dict[str, Any]) -> str:
    """The tag of weights trained on ``data_name`` with ``model_args`` (ConfigError if none fits)."""
    for tag, info in TAGS.items():
        if info.data == data_name and all(model_args.get(k) == v for k, v in info.model_args.items()):
            return tag
    raise ConfigError(f'no pretrained tag means weights trained on {data_name} with {model_args}; the tags are '
                      f'{", ".join(f"{t} ({i.data}, {i.model_args})" for t, i in TAGS.items())}: '
                      f'train with the settings of one of them, or add a tag that means these to TAGS in '
                      f'sd_zoo/models/tags.py')


def _cfg(model_name: str, tag: str, **kwargs) -> Dict[str, Any]:
    info = tag_info(tag)
    return dict(hf_hub_id=f'{HUB_ORG}/{model_name}.{tag}', num_classes=info.num_classes, mean=info.mean, std=info.std,
                first_conv='conv1', classifier='fc', interpolation='bilinear', license=LICENSE, paper_ids=PAPER_ID,
                paper_name=PAPER_NAME, **kwargs)


def cifar_cfg(model_name: str, tag: str) -> Dict[str, Any]:
    return _cfg(model_name, tag, input_size=(3, 32, 32), pool_size=(8, 8), crop_pct=1.0,
                origin_url='https://github.com/yueatsprograms/Stochastic_Depth')


def imagenet_cfg(model_name: str, tag: str) -> Dict[str, Any]:
    return _cfg(model_name, tag, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875)


def tag_model_args(variant: str, tag: Optional[str]) -> Dict[str, Any]:
    """The create_model arguments that weights of ``variant.tag`` need."""
    return dict(tag_info(tag).model_args) if tag else {}


def resolve_tag(variant: str, pretrained_cfg) -> Optional[str]:
    """The pretrained tag requested through ``create_model('variant.tag')``; a clear error if unknown."""
    if isinstance(pretrained_cfg, str):
        known = list_pretrained(f'{variant}.*')
        if f'{variant}.{pretrained_cfg}' not in known:
            raise ConfigError(f'unknown pretrained tag {variant}.{pretrained_cfg}; '
                              f'known tags: {", ".join(known) or "none"}')
        return pretrained_cfg
    if pretrained_cfg is None:
        pretrained_cfg = get_pretrained_cfg(variant)
    return pretrained_cfg.get('tag') if isinstance(pretrained_cfg, dict) else getattr(pretrained_cfg, 'tag', None)


def normalization(model: nn.Module) -> Tuple[Sequence[float], Sequence[float]]:
    """(mean, std) the model's weights expect: its ``pretrained_cfg``'s, which :func:`sd_zoo.load_model` sets."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return tuple(cfg.get('mean', CIFAR10_MEAN)), tuple(cfg.get('std', CIFAR10_STD))
