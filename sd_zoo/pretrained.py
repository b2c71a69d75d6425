"""Pretrained-weight registry of sd-zoo: which tags have published weights, and the settings they carry.

Every pretrained tag has a full ``hf_hub_id`` in its model's default cfg (one Hub repo per model and
tag under :data:`HUB_ORG`). A tag is listed in :data:`PUBLISHED` only once its weights exist; asking
for ``pretrained=True`` on any other tag fails at once with a message that says how to get weights,
rather than with a network error.

Weights trained with settings other than the architecture's defaults (constant depth, another
``p_L``) record them in :data:`TAG_MODEL_ARGS`, so that ``create_model('name.tag', pretrained=True)``
rebuilds the network they were trained as (the Hub's config.json carries the same ``model_args``).
"""
from typing import Any, Dict, Optional

from timm.models import get_pretrained_cfg, list_pretrained
from timm.models._builder import resolve_pretrained_cfg

from .errors import ConfigError, WeightsError

HUB_ORG = 'sd-zoo'
PAPER_ID = 'arXiv:1603.09382'
PAPER_NAME = 'Deep Networks with Stochastic Depth'
LICENSE = 'apache-2.0'

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

# 'model.tag' of every weight that has been published.
PUBLISHED = set()

# Model kwargs that weights of a tag were trained with, where they differ from the defaults.
TAG_MODEL_ARGS: Dict[str, Dict[str, Any]] = {}


def hub_id(model_name: str, tag: str) -> str:
    return f'{HUB_ORG}/{model_name}.{tag}'


def cifar_cfg(model_name: str, tag: str, num_classes: int = 10, **kwargs) -> Dict[str, Any]:
    mean, std = (CIFAR100_MEAN, CIFAR100_STD) if num_classes == 100 else (CIFAR10_MEAN, CIFAR10_STD)
    cfg = dict(
        hf_hub_id=hub_id(model_name, tag),
        num_classes=num_classes, input_size=(3, 32, 32), pool_size=(8, 8), crop_pct=1.0,
        interpolation='bilinear', mean=mean, std=std, first_conv='conv1', classifier='fc',
        license=LICENSE, paper_ids=PAPER_ID, paper_name=PAPER_NAME,
        origin_url='https://github.com/yueatsprograms/Stochastic_Depth',
    )
    cfg.update(kwargs)
    return cfg


def tag_model_args(variant: str, tag: Optional[str]) -> Dict[str, Any]:
    if not tag:
        return {}
    return dict(TAG_MODEL_ARGS.get(f'{variant}.{tag}', {}))


def resolve_tag(variant: str, pretrained_cfg) -> Optional[str]:
    """The pretrained tag requested through ``create_model('variant.tag')``; a clear error if unknown."""
    if isinstance(pretrained_cfg, str):
        if get_pretrained_cfg(f'{variant}.{pretrained_cfg}') is None:
            known = ', '.join(list_pretrained(f'{variant}.*')) or 'none'
            raise ConfigError(f'unknown pretrained tag {variant}.{pretrained_cfg}; known tags: {known}')
        return pretrained_cfg
    if pretrained_cfg is None:
        cfg = get_pretrained_cfg(variant)
        return cfg.tag if cfg is not None else None
    tag = pretrained_cfg.get('tag') if isinstance(pretrained_cfg, dict) else getattr(pretrained_cfg, 'tag', None)
    return tag


def check_weights_available(variant: str, pretrained_cfg, pretrained_cfg_overlay: Optional[Dict]) -> None:
    """Fail fast, before any download, when ``pretrained=True`` asks for weights that do not exist yet."""
    overlay = pretrained_cfg_overlay or {}
    if any(overlay.get(k) for k in ('file', 'state_dict', 'url')):
        return  # the user points at their own weights
    if pretrained_cfg is not None and not isinstance(pretrained_cfg, str):
        return  # a full cfg, e.g. from an hf-hub: model id: the Hub repo is the source
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg, overlay)
    name = f'{variant}.{cfg.tag}' if cfg.tag else variant
    if name in PUBLISHED or cfg.file or cfg.url:
        return
    raise WeightsError(
        f'no published weights for {name} yet (its Hub repo {cfg.hf_hub_id} has none). '
        f'Train them with `sd-zoo train --model {variant} ...`, then load the result with '
        f'`sd-zoo eval --model {variant} --checkpoint RUN/final.safetensors` or '
        f"`timm.create_model('{variant}', pretrained=True, "
        f"pretrained_cfg_overlay=dict(file='RUN/final.safetensors'))`. "
        f'Published weights: {", ".join(sorted(PUBLISHED)) or "none yet"}.')
