"""Weights files: safetensors whose metadata lets sd-zoo rebuild the network, and whose bytes are verified.

A weights file written by sd-zoo carries, as safetensors string metadata (``files.encode_metadata``):

* ``sd_zoo.model``: the registered architecture (``sd_resnet110``);
* ``sd_zoo.num_classes``, ``sd_zoo.in_chans``;
* ``sd_zoo.model_args``: the stochastic-depth settings as ``create_model`` keyword arguments
  (``model.sd_config()``), so that evaluation and export rebuild the network the weights were trained as;
* ``sd_zoo.tensors_sha256``: a digest of every tensor's name, dtype, shape and bytes, checked on each load;
* anything else the caller adds (``sd_zoo.data``, ``sd_zoo.recipe``, ``sd_zoo.init_from``, ...).

The header is written with its keys in a fixed order, so the same tensors and metadata always give the
same file, byte for byte. Weights load from safetensors only: nothing is ever unpickled.
"""
import hashlib
import json
import struct
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn

from ..errors import ConfigError, WeightsError
from ..files import PathLike, atomic_write, decode_metadata, encode_metadata, refuse_pickle


def tensors_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """Digest of a state dict's contents: each tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f'{name}|{t.dtype}|{tuple(t.shape)}|'.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _canonical(blob: bytes) -> bytes:
    """A safetensors file with its JSON header re-serialised in sorted key order (same tensors, same offsets)."""
    (n,) = struct.unpack('<Q', blob[:8])
    header = json.dumps(json.loads(blob[8:8 + n]), sort_keys=True, separators=(',', ':')).encode()
    header += b' ' * (-len(header) % 8)  # the tensor data stays 8-byte aligned
    return struct.pack('<Q', len(header)) + header + blob[8 + n:]


def save_weights(model: nn.Module, path: PathLike, model_name: Optional[str] = None, **extra: Any) -> Path:
    """Write the model's state dict as safetensors with the metadata that lets :func:`sd_zoo.load_model`
    rebuild ``model`` exactly, atomically and reproducibly."""
    from safetensors.torch import save

    name = model_name or getattr(model, 'pretrained_cfg', {}).get('architecture')
    if not name:
        raise ConfigError('cannot tell the architecture of this model: pass model_name=')
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = dict(model=name, num_classes=str(model.num_classes), in_chans=str(getattr(model, 'in_chans', 3)))
    if hasattr(model, 'sd_config'):
        meta['model_args'] = model.sd_config()
    meta.update(extra, tensors_sha256=tensors_sha256(state))
    blob = _canonical(save(state, metadata=dict(encode_metadata(meta), format='pt')))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: tmp.write_bytes(blob))


def _unreadable(path: Path, e: Exception) -> WeightsError:
    return WeightsError(f'{path} is not a readable safetensors file ({e}); re-download or re-export it')


def read_metadata(path: PathLike) -> Dict[str, Any]:
    """The ``sd_zoo.*`` metadata of a safetensors file, JSON values decoded, prefix removed."""
    from safetensors import safe_open

    path = Path(path)
    refuse_pickle(path)
    if not path.is_file():
        raise WeightsError(f'weights file {path} does not exist')
    try:
        with safe_open(str(path), framework='pt') as f:
            return decode_metadata(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise _unreadable(path, e) from e


def load_state_dict(path: PathLike, sha256: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Tensors of a safetensors file, after checking its bytes.

    ``sha256``: the digest the whole file must have (a published manifest entry, a cache blob's name).
    A file written by sd-zoo also carries the digest of its tensors, which is always checked.
    """
    from safetensors.torch import load

    path = Path(path)
    meta = read_metadata(path)
    blob = path.read_bytes()
    if sha256 is not None and (actual := hashlib.sha256(blob).hexdigest()) != sha256:
        raise WeightsError(f'{path} is corrupt: its sha256 is {actual}, but {sha256} was recorded for it; '
                           f'delete it and download or rebuild it')
    try:
        state = load(blob)
    except Exception as e:
        raise _unreadable(path, e) from e
    recorded = meta.get('tensors_sha256')
    if recorded is not None and (actual := tensors_sha256(state)) != recorded:
        raise WeightsError(f'{path} is corrupt: its tensors digest to {actual}, but the file records {recorded}; '
                           f'delete it and download or rebuild it')
    return state


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
