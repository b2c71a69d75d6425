"""Files sd-zoo writes and reads: atomic writes, sha256 digests, the pickle guard, and the metadata encoding.

The ``sd_zoo.*`` string metadata is stored alike in safetensors headers and ONNX ``metadata_props``:
JSON values, keys in a fixed order, so that the same content always gives the same bytes.
"""
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Union

from .errors import ConfigError, WeightsError

PathLike = Union[str, os.PathLike]

META_PREFIX = 'sd_zoo.'
PICKLE_SUFFIXES = ('.pth', '.pt', '.bin', '.ckpt', '.pkl', '.tar')


def new_file_mode(base: int = 0o666) -> int:
    """The permission bits a new file (``base`` 0o666) or folder (0o777) gets under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return base & ~umask


def atomic_write(path: PathLike, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` to ``.{name}.{pid}.tmp`` beside ``path``, then rename it over ``path``, so that a crash
    leaves the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    try:
        write(tmp)
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def remove_stale_temps(folder: PathLike) -> int:
    """Delete the temporary files of interrupted :func:`atomic_write` calls in ``folder``; returns how many."""
    removed = 0
    for tmp in Path(folder).glob('.*.tmp'):
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


def sha256_file(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def refuse_pickle(path: PathLike) -> None:
    """sd-zoo reads weights from safetensors only, since unpickling can run code."""
    if Path(path).suffix in PICKLE_SUFFIXES:
        raise WeightsError(
            f'{path} is a pickle-based checkpoint; sd-zoo loads weights from safetensors only, since unpickling '
            f'can run arbitrary code. Convert it where you trust it (safetensors.torch.save_file) and load the '
            f'.safetensors file')


def encode_metadata(meta: Mapping[str, Any]) -> Dict[str, str]:
    """``{'sd_zoo.key': 'json'}`` in sorted key order (strings stay as they are)."""
    return {META_PREFIX + k: v if isinstance(v, str) else json.dumps(v, sort_keys=True)
            for k, v in sorted(meta.items())}


def set_onnx_metadata(proto, meta: Mapping[str, Any]) -> Dict[str, str]:
    """Replace an ONNX ModelProto's ``metadata_props`` by ``meta``, encoded; returns the strings written."""
    strings = encode_metadata(meta)
    del proto.metadata_props[:]
    for k, v in strings.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    return strings


def decode_metadata(raw: Mapping[str, str]) -> Dict[str, Any]:
    """The ``sd_zoo.*`` entries of string metadata, prefix removed and JSON decoded.

    Files written before sd-zoo 0.2 stored the stochastic-depth settings as ``sd_config`` with their own
    key names; they come back as ``model_args``, the create_model keyword arguments used everywhere now.
    """
    meta = {}
    for key, value in raw.items():
        if key.startswith(META_PREFIX):
            try:
                value = json.loads(value)
            except ValueError:
                pass
            meta[key[len(META_PREFIX):]] = value
    legacy = meta.pop('sd_config', None)
    if isinstance(legacy, dict) and 'model_args' not in meta:
        meta['model_args'] = legacy_model_args(legacy)
    return meta


def legacy_model_args(sd_config: Mapping[str, Any]) -> Dict[str, Any]:
    """create_model kwargs from the pre-0.2 ``sd_config`` (schedule, drop_path_rate, survival_probs, gate, rule)."""
    try:
        args: Dict[str, Any] = dict(sd_gate=sd_config['gate'], sd_rule=sd_config['rule'])
        if sd_config['schedule'] == 'explicit':
            args['sd_probs'] = [float(p) for p in sd_config['survival_probs']]
        else:
            args.update(drop_path_rate=float(sd_config['drop_path_rate']), sd_schedule=sd_config['schedule'])
    except (KeyError, TypeError) as e:
        raise ConfigError(f'unreadable stochastic-depth settings {dict(sd_config)!r} (missing {e})') from None
    return args
