"""Weights files: safetensors with the model's stochastic-depth settings in the metadata.

A weights file written by sd-zoo carries, as safetensors string metadata:

* ``sd_zoo.model``: the registered architecture (``sd_resnet110``);
* ``sd_zoo.num_classes``, ``sd_zoo.in_chans``;
* ``sd_zoo.sd_config``: JSON of the stochastic-depth settings (schedule, drop_path_rate, survival_probs,
  gate, rule), so that evaluation and ONNX export use the probabilities the weights were trained with;
* anything else the caller adds (``sd_zoo.data``, ``sd_zoo.recipe``, ...).

Weights load from safetensors only; pickle-based files are refused unless a caller asks for them
explicitly (and are then read with ``torch.load(weights_only=True)``).
"""
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from .errors import ConfigError, WeightsError

PREFIX = 'sd_zoo.'
PICKLE_SUFFIXES = ('.pth', '.pt', '.bin', '.ckpt', '.pkl', '.tar')


def sd_model_kwargs(sd_config: Dict[str, Any]) -> Dict[str, Any]:
    """``create_model`` kwargs that rebuild a model with the given stochastic-depth settings."""
    kwargs = dict(
        drop_path_rate=float(sd_config.get('drop_path_rate', 0.5)),
        sd_gate=sd_config.get('gate', 'batch'),
        sd_rule=sd_config.get('rule', 'paper'),
    )
    schedule = sd_config.get('schedule', 'linear')
    if schedule == 'explicit':
        kwargs['sd_probs'] = [float(p) for p in sd_config['survival_probs']]
    else:
        kwargs['sd_schedule'] = schedule
    return kwargs


def weights_metadata(model: nn.Module, model_name: Optional[str] = None, **extra: Any) -> Dict[str, str]:
    """The safetensors metadata that lets :func:`load_weights` rebuild ``model`` exactly."""
    name = model_name or getattr(model, 'pretrained_cfg', {}).get('architecture')
    if not name:
        raise ConfigError('cannot tell the architecture of this model: pass model_name=')
    meta = {
        'format': 'pt',
        PREFIX + 'model': name,
        PREFIX + 'num_classes': str(model.num_classes),
        PREFIX + 'in_chans': str(getattr(model, 'in_chans', 3)),
    }
    if hasattr(model, 'sd_config'):
        meta[PREFIX + 'sd_config'] = json.dumps(model.sd_config())
    for k, v in extra.items():
        meta[PREFIX + k] = v if isinstance(v, str) else json.dumps(v)
    return meta


def save_weights(model: nn.Module, path: Union[str, Path], model_name: Optional[str] = None, **extra: Any) -> Path:
    """Write the model's state dict as safetensors, atomically (temp file in the same folder + rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = weights_metadata(model, model_name, **extra)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix='.tmp')
    os.close(fd)
    try:
        save_file(state, tmp, metadata=meta)
        os.chmod(tmp, 0o644)  # mkstemp creates owner-only files; weights are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _check_file(path: Path, allow_pickle: bool) -> None:
    if not path.is_file():
        raise WeightsError(f'weights file {path} does not exist')
    if path.suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise WeightsError(
            f'{path} is a pickle-based checkpoint; sd-zoo loads weights from safetensors only, since unpickling '
            f'can run arbitrary code. Convert it where you trust it (safetensors.torch.save_file), or pass '
            f'allow_pickle=True to read it with torch.load(weights_only=True)')


def read_metadata(path: Union[str, Path]) -> Dict[str, Any]:
    """The ``sd_zoo.*`` metadata of a safetensors file, JSON values decoded, prefix removed."""
    from safetensors import safe_open

    path = Path(path)
    _check_file(path, allow_pickle=False)
    try:
        with safe_open(str(path), framework='pt') as f:
            raw = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise WeightsError(f'{path} is not a readable safetensors file ({e}); re-download or re-export it') from e
    meta = {}
    for k, v in raw.items():
        if not k.startswith(PREFIX):
            continue
        try:
            meta[k[len(PREFIX):]] = json.loads(v)
        except ValueError:
            meta[k[len(PREFIX):]] = v
    return meta


def load_state_dict(path: Union[str, Path], allow_pickle: bool = False) -> Dict[str, torch.Tensor]:
    """Tensors of a weights file; safetensors unless ``allow_pickle`` is given for a .pth-style file."""
    path = Path(path)
    _check_file(path, allow_pickle)
    if path.suffix in PICKLE_SUFFIXES:
        state = torch.load(path, map_location='cpu', weights_only=True)
        return state.get('state_dict', state) if isinstance(state, dict) else state
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except Exception as e:
        raise WeightsError(f'{path} is not a readable safetensors file ({e}); re-download or re-export it') from e


def load_into(model: nn.Module, state_dict: Dict[str, torch.Tensor], source: str = 'state dict') -> None:
    """Strict load that names missing and unexpected keys (and shape mismatches) in its error."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong_shape = [f'{k}: {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}'
                   for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or wrong_shape:
        def _fmt(keys):
            return ', '.join(keys[:6]) + (f' (+{len(keys) - 6} more)' if len(keys) > 6 else '') if keys else 'none'
        raise WeightsError(
            f'{source} does not fit {getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)}: '
            f'missing keys: {_fmt(missing)}; unexpected keys: {_fmt(unexpected)}; '
            f'shape mismatches: {_fmt(wrong_shape)}. Is it a checkpoint of another architecture or class count?')
    model.load_state_dict(state_dict, strict=True)


def load_weights(
        path: Union[str, Path],
        model_name: Optional[str] = None,
        allow_pickle: bool = False,
        **model_kwargs: Any,
) -> nn.Module:
    """Build the model a weights file was trained as and load it (eval mode).

    Args:
        path: a safetensors file written by sd-zoo (or any safetensors state dict with ``model_name``).
        model_name: architecture; defaults to the file's ``sd_zoo.model`` metadata.
        allow_pickle: accept a pickle-based file (read with ``torch.load(weights_only=True)``).
        **model_kwargs: override the stored settings, e.g. ``drop_path_rate=0.2``.
    """
    import timm

    path = Path(path)
    meta = read_metadata(path) if path.suffix not in PICKLE_SUFFIXES else {}
    name = model_name or meta.get('model')
    if not name:
        raise WeightsError(f'{path} does not say which architecture it holds; pass the model name (--model)')
    kwargs: Dict[str, Any] = {}
    if 'num_classes' in meta:
        kwargs['num_classes'] = int(meta['num_classes'])
    if 'in_chans' in meta:
        kwargs['in_chans'] = int(meta['in_chans'])
    if 'sd_config' in meta:
        kwargs.update(sd_model_kwargs(meta['sd_config']))
    elif not any(k in model_kwargs for k in ('drop_path_rate', 'sd_probs')):
        warnings.warn(
            f'{path} carries no stochastic-depth settings; using the defaults of {name} '
            f'(drop_path_rate=0.5, linear, paper rule). Pass drop_path_rate= if it was trained otherwise.')
    if 'sd_probs' in model_kwargs:
        kwargs.pop('sd_schedule', None)
    elif 'sd_schedule' in model_kwargs or 'drop_path_rate' in model_kwargs:
        kwargs.pop('sd_probs', None)
    kwargs.update(model_kwargs)
    model = timm.create_model(name, pretrained=False, **kwargs)
    load_into(model, load_state_dict(path, allow_pickle=allow_pickle), source=str(path))
    return model.eval()
