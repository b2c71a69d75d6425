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

The commands load through :func:`load_named`, which also gives the :class:`Provenance` their results name
the weights by: a file by its path and sha256, and a published ``model.tag`` only for its published weights.
"""
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import timm
from timm.models import split_model_name_tag
from torch import nn

from .. import data
from .checkpoint import load_into, load_state_dict, read_metadata
from ..errors import ConfigError, WeightsError
from ..files import PICKLE_SUFFIXES, PathLike, sha256_file
from . import pretrained as registry
from ..models.block_slots import apply_keep_blocks
from ..models.tags import resolve_tag

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
        resolve_tag(arch, tag)


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


def is_weights_path(source: PathLike) -> bool:
    """Whether :func:`load_model` reads ``source`` as a Hub folder or a weights file (else it is a model name)."""
    path = Path(source)
    return path.is_dir() or path.suffix == '.safetensors' or path.suffix in PICKLE_SUFFIXES or path.is_file()


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
        return apply_keep_blocks(load_model(source, pretrained=pretrained, model_name=model_name, **overrides), keep)
    path = Path(source)
    if path.is_dir():
        return load_hub_folder(path, **overrides)
    if is_weights_path(path):
        return load_weights_file(path, model_name, **overrides)
    name = str(source)
    check_model_name(name)
    if not pretrained:
        return timm.create_model(name, pretrained=False, **overrides).eval()
    arch, tag = split_model_name_tag(name)
    tag = resolve_tag(arch, tag or None)
    shipped = registry.SHIPPED_DIR / f'{arch}.{tag}'
    if (shipped / registry.WEIGHTS_FILE).is_file():
        return load_hub_folder(shipped, **overrides)
    return timm.create_model(f'{arch}.{tag}', pretrained=True, **overrides).eval()


# --- what a result names its weights by ---------------------------------------------------------------------

@dataclass(frozen=True)
class Provenance:
    """What a result (a printed line, a JSON field, ONNX metadata) names its weights by.

    ``model`` is the published ``model.tag`` only for the very weights published.json records for it, else
    the architecture; ``weights`` is the tag, the file or folder the weights were read from, or
    ``'random initialisation'``; ``sha256`` the digest of the weights file, where known.
    """
    model: str
    weights: str
    sha256: Optional[str] = None

    def fields(self) -> Dict[str, str]:
        """``model``, ``weights`` and ``weights_sha256`` (where known), for JSON output and metadata."""
        return dict(model=self.model, weights=self.weights, **({'weights_sha256': self.sha256} if self.sha256 else {}))

    def __str__(self) -> str:
        if self.weights == self.model:
            return self.model
        return f'{self.model} ({self.weights}' + (f', sha256 {self.sha256[:12]})' if self.sha256 else ')')


def weights_file(source: PathLike) -> Path:
    """The safetensors file a weights source holds: the file itself, or a Hub folder's model.safetensors."""
    path = Path(source)
    return path / registry.WEIGHTS_FILE if path.is_dir() else path


def published_name(sha256: str) -> Optional[str]:
    """The ``model.tag`` whose published weights have this sha256 (published.json), if any."""
    return next((name for name, entry in registry.load_manifest().items() if entry.get('sha256') == sha256), None)


def _refuse_tag_for_other_weights(model_name: str, source: PathLike, sha256: str) -> None:
    """A ``model.tag`` names the published weights of the tag; a file holding others may not carry its name."""
    arch, tag = split_model_name_tag(model_name)
    if not tag:
        return
    recorded = registry.load_manifest().get(model_name, {}).get('sha256')
    if recorded == sha256:
        return
    mismatch = (f'the published weights of that tag (sha256 {recorded[:12]}), but {source} holds others '
                f'(sha256 {sha256[:12]})' if recorded else
                f'published weights, but that tag has none, so {source} cannot be them')
    raise ConfigError(f'--model {model_name} names {mismatch}: give its architecture (--model {arch}) or no '
                      f'--model, and the results are named after the file')


def load_named(source: PathLike, *, pretrained: bool = True, model_name: Optional[str] = None,
               **overrides: Any) -> Tuple[nn.Module, Provenance]:
    """:func:`load_model`, and the :class:`Provenance` that results of the model must name.

    A weights file or Hub folder is named after itself and its sha256, with the published ``model.tag``
    whose recorded sha256 it has, else its architecture. ``model_name`` may give the architecture of a
    file without metadata; a ``model.tag`` is accepted with a file only when the file holds the published
    weights of that tag (else a ConfigError), so that no result carries a tag's name for other weights.
    A name loads the published weights of its tag (of the architecture's default tag when it has none).
    """
    model = load_model(source, pretrained=pretrained, model_name=model_name, **overrides)
    arch = model.pretrained_cfg.get('architecture') or split_model_name_tag(str(source))[0]
    if is_weights_path(source):
        sha256 = sha256_file(weights_file(source))
        if model_name:
            _refuse_tag_for_other_weights(model_name, source, sha256)
        published = published_name(sha256)
        name = published if published and split_model_name_tag(published)[0] == arch else arch
        return model, Provenance(name, str(source), sha256)
    if not pretrained:
        return model, Provenance(arch, 'random initialisation')
    tag = resolve_tag(arch, split_model_name_tag(str(source))[1] or None)
    name = f'{arch}.{tag}' if tag else arch
    return model, Provenance(name, name, registry.load_manifest().get(name, {}).get('sha256'))
