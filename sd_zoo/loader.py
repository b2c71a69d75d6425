"""The one model loader: a registered name, a pretrained tag, a Hub folder or a weights file -> a model.

    load_model('sd_resnet110.c10j75')                # published weights: the checkout's hub_configs/,
                                                     # else the Hugging Face cache, else the Hub
    load_model('hub_configs/sd_resnet20.c10j75')     # a Hub folder
    load_model('runs/r110/best.safetensors')         # weights written by sd-zoo
    load_model('sd_resnet110', pretrained=False, drop_path_rate=0.2)   # fresh weights

The model comes back in eval mode, built with the settings its weights were trained with (keyword
overrides replace them), and its ``pretrained_cfg`` carries the normalisation those weights expect
(``mean``, ``std``): evaluation, export, validation, the demo and the Hub tools all read it there.
Every byte of the weights is verified first (``checkpoint.load_state_dict``).
"""
import argparse
import warnings
from pathlib import Path
from typing import Any, Dict, Optional

import timm
from timm.models import split_model_name_tag
from torch import nn

from . import data
from .checkpoint import load_into, load_state_dict, read_metadata
from .errors import ConfigError, WeightsError
from .files import PICKLE_SUFFIXES, PathLike
from . import pretrained as registry

# The stochastic-depth create_model arguments that the command line sets (one flag each).
MODEL_ARG_NAMES = ('drop_path_rate', 'sd_schedule', 'sd_probs', 'sd_gate', 'sd_rule')
# Keyword arguments that describe one survival schedule; an override of one replaces the stored others.
_SCHEDULE_ARGS = {'sd_probs': ('drop_path_rate', 'sd_schedule'), 'drop_path_rate': ('sd_probs',),
                  'sd_schedule': ('sd_probs',)}


def check_model_name(name: str) -> None:
    """ConfigError naming the sd-zoo models for an unknown architecture, and the tags for an unknown tag."""
    arch, tag = split_model_name_tag(name)
    if not timm.is_model(arch):
        raise ConfigError(f'unknown model {arch!r}; sd-zoo models: {", ".join(timm.list_models("sd_*"))}')
    if tag:
        registry.resolve_tag(arch, tag)


def merge_model_args(stored: Dict[str, Any], overrides: Dict[str, Any]) -> Dict[str, Any]:
    """Stored create_model arguments updated by ``overrides`` (an override of the schedule replaces it whole)."""
    merged = dict(stored)
    for key in overrides:
        for replaced in _SCHEDULE_ARGS.get(key, ()):
            merged.pop(replaced, None)
    merged.update(overrides)
    return merged


def load_weights_file(path: PathLike, model_name: Optional[str] = None, **overrides: Any) -> nn.Module:
    """The network a safetensors file written by sd-zoo was trained as, with its weights (eval mode)."""
    path = Path(path)
    meta = read_metadata(path)
    name = model_name or meta.get('model')
    if not name:
        raise WeightsError(f'{path} does not say which architecture it holds; pass the model name (--model)')
    check_model_name(name)
    stored: Dict[str, Any] = {k: int(meta[k]) for k in ('num_classes', 'in_chans') if k in meta}
    if 'model_args' in meta:
        stored.update(meta['model_args'])
    elif not {'drop_path_rate', 'sd_probs'} & set(overrides):
        warnings.warn(f'{path} carries no stochastic-depth settings; using the defaults of {name}. '
                      f'Pass drop_path_rate= if it was trained otherwise.')
    model = timm.create_model(name, pretrained=False, **merge_model_args(stored, overrides))
    load_into(model, load_state_dict(path), source=str(path))
    cfg = dict(model.pretrained_cfg, **{k: meta[k] for k in ('tag', 'data', 'init_from') if k in meta})
    if meta.get('data') in data.DATASETS:  # the normalisation the weights were trained with
        info = data.dataset_info(meta['data'])
        cfg.update(mean=tuple(info.mean), std=tuple(info.std))
    model.pretrained_cfg = model.default_cfg = cfg
    return model.eval()


def load_hub_folder(folder: PathLike, **overrides: Any) -> nn.Module:
    """A Hub repo folder (config.json + model.safetensors), as ``timm.create_model('local-dir:...')``."""
    folder = Path(folder)
    for needed in ('config.json', registry.WEIGHTS_FILE):
        if not (folder / needed).is_file():
            raise WeightsError(f'{folder} is not a Hub folder: it has no {needed}')
    return timm.create_model(f'local-dir:{folder}', pretrained=True, **overrides).eval()


def load_model(source: PathLike, *, pretrained: bool = True, model_name: Optional[str] = None,
               **overrides: Any) -> nn.Module:
    """A model in eval mode from a name, ``name.tag``, a Hub folder or a weights file; see the module doc.

    Args:
        source: ``'sd_resnet110'`` / ``'sd_resnet110.c10j75'``, a folder of ``hub_configs/``, or a .safetensors file.
        pretrained: for a name, load the tag's published weights (the architecture's default tag if none is
            given); False builds fresh weights.
        model_name: architecture of a weights file that does not record it.
        **overrides: ``create_model`` keyword arguments replacing the stored ones (``drop_path_rate=0.2``).
    """
    keep = overrides.pop('sd_keep_blocks', None)
    if keep is not None:  # pruning applies to the weights as trained, once they have loaded
        from .pruning import apply_keep_blocks  # a top-level import would be circular (pruning -> evaluate -> here)
        return apply_keep_blocks(load_model(source, pretrained=pretrained, model_name=model_name, **overrides), keep)
    path = Path(source)
    if path.is_dir():
        return load_hub_folder(path, **overrides)
    if path.suffix == '.safetensors' or path.suffix in PICKLE_SUFFIXES or path.is_file():
        return load_weights_file(path, model_name, **overrides)
    name = str(source)
    check_model_name(name)
    if not pretrained:
        return timm.create_model(name, pretrained=False, **overrides).eval()
    arch, tag = split_model_name_tag(name)
    tag = registry.resolve_tag(arch, tag or None)
    shipped = registry.SHIPPED_DIR / f'{arch}.{tag}'
    if (shipped / registry.WEIGHTS_FILE).is_file():
        return load_hub_folder(shipped, **overrides)
    return timm.create_model(f'{arch}.{tag}', pretrained=True, **overrides).eval()


# --- command line -----------------------------------------------------------------------------------------

def _probabilities(value: str):
    try:
        return [float(p) for p in value.split(',')]
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected comma-separated probabilities p_1,...,p_L, got {value!r}') from None


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The stochastic-depth flags, named after the create_model arguments they set (default: the model's own)."""
    from .stochastic_depth import GATES, RULES, SCHEDULES

    g = p.add_argument_group('stochastic depth (default: the model\'s own, or its tag\'s)')
    g.add_argument('--drop-path-rate', type=float, metavar='R', help='1 - p_L: 0.5 in the paper, 0 = constant depth')
    g.add_argument('--sd-schedule', choices=SCHEDULES, help='decay of survival probabilities over blocks')
    g.add_argument('--sd-probs', type=_probabilities, metavar='P1,...,PL', help='explicit survival probabilities')
    g.add_argument('--sd-gate', choices=GATES, help='one draw per block per mini-batch (paper) or per sample')
    g.add_argument('--sd-rule', choices=RULES, help='paper: eval scales branches by p_l; inverted: training divides')


def model_args_of(args: argparse.Namespace) -> Dict[str, Any]:
    """The create_model arguments given on the command line by :func:`add_model_arguments`'s flags."""
    return {k: getattr(args, k) for k in MODEL_ARG_NAMES if getattr(args, k, None) is not None}
