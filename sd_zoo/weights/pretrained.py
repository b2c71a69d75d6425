"""Published weights: the manifest of what was published, and finding and verifying weights for a tag.

What a tag means is :data:`sd_zoo.models.tags.TAGS`. The packaged manifest ``published.json`` records what
``sd-zoo hub build`` built for each published ``model.tag`` (sha256 of model.safetensors, model args, test
error); weights are verified against it, but it never changes how a model is built.

Weights are found in the Hugging Face cache (a download, or ``sd-zoo hub seed-cache`` from a checkout's
``hub_configs/``). When they are not cached, one short probe of the Hub decides: no retries, so that a
machine without network fails in seconds with a WeightsError rather than after a minute of back-off.
``create_model(..., pretrained=True)`` takes its tensors from :func:`pretrained_state`, which this module
hands to the models on import (they import nothing from here).
"""
import json
from pathlib import Path
from typing import Any, Dict, Optional

from timm.models._builder import resolve_pretrained_cfg
from timm.models._hub import hf_split

from .. import data
from .checkpoint import load_state_dict
from ..errors import ConfigError, WeightsError
from ..files import PathLike, atomic_write_text
from ..models.sd_resnet_base import set_pretrained_reader
from ..models.tags import TAGS

WEIGHTS_FILE = 'model.safetensors'

MANIFEST_PATH = Path(__file__).with_name('published.json')
# The checkout's folder of Hub repos (absent in an installed wheel); see ``sd-zoo hub seed-cache``.
SHIPPED_DIR = Path(__file__).resolve().parents[2] / 'hub_configs'


def load_manifest(path: Optional[PathLike] = None) -> Dict[str, Dict[str, Any]]:
    """``{'model.tag': {'sha256': ..., 'model_args': {...}, 'top1_err': ...}}`` of published weights."""
    path = Path(path or MANIFEST_PATH)
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f'{path} is not valid JSON ({e}); restore it from version control') from e


def write_manifest_entry(name: str, entry: Dict[str, Any], path: Optional[PathLike] = None) -> None:
    """Record what was built for ``name`` (sorted, so that rebuilding one entry leaves a one-entry diff)."""
    path = Path(path or MANIFEST_PATH)
    manifest = load_manifest(path)
    manifest[name] = entry
    atomic_write_text(path, json.dumps(manifest, indent=2, sort_keys=True) + '\n')


def best_published(data_name: str, path: Optional[PathLike] = None) -> Optional[str]:
    """The published ``model.tag`` of lowest recorded test error among those whose tag means ``data_name``
    (None where none is published): what ``sd-zoo demo`` shows by default."""
    scored = [(entry['top1_err'], name) for name, entry in load_manifest(path).items()
              if name.partition('.')[2] in TAGS and TAGS[name.partition('.')[2]].data == data_name
              and entry.get('top1_err') is not None]
    return min(scored)[1] if scored else None


def _repo_name(repo_id: str) -> str:
    """'sd-zoo/sd_resnet20.c10j75@rev' -> 'sd_resnet20.c10j75': sd-zoo names each repo after its model.tag."""
    return hf_split(repo_id)[0].split('/')[-1]


def train_hint(name: str) -> str:
    """How to train weights for ``name`` with sd-zoo, where its trainer supports the tag's data."""
    arch, _, tag = name.partition('.')
    info = TAGS.get(tag)
    if info is None or 'test' not in getattr(data.DATASETS.get(info.data), 'splits', ()):
        return ''
    return f' Train them with `sd-zoo train --model {arch} --data {info.data}` (then `sd-zoo hub build`).'


def how_to_get_weights(name: str) -> str:
    """The ways to obtain weights for ``name`` without the Hub, for error messages."""
    shipped = SHIPPED_DIR / name
    seed = (f'this checkout ships them in {shipped.name}/ under hub_configs/: run `sd-zoo hub seed-cache`'
            if (shipped / WEIGHTS_FILE).exists() else
            'seed the cache from a checkout that ships hub_configs/ with `sd-zoo hub seed-cache`')
    return (f'To load without network, {seed}, then set HF_HUB_OFFLINE=1; or pass a local file with '
            f"timm.create_model('{name}', pretrained=True, pretrained_cfg_overlay=dict(file='model.safetensors'))")


def _sha256_of_blob(path: str) -> Optional[str]:
    """The sha256 a Hugging Face cache file must have: large (LFS) files are stored under that name."""
    blob = Path(path).resolve().name
    return blob if len(blob) == 64 and all(c in '0123456789abcdef' for c in blob) else None


def hub_file(repo_id: str, name: str, filename: str = WEIGHTS_FILE, published: bool = True,
             cache_dir: Optional[PathLike] = None) -> str:
    """Local path of ``filename`` from the Hub repo ``repo_id``: cached, else downloaded; else a WeightsError.

    Before a download, unless offline mode forbids it, a single HEAD request without retries
    (huggingface_hub's back-off spends about 25 s on an unreachable Hub) tells whether it can work.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    repo, revision = hf_split(repo_id)
    cached = try_to_load_from_cache(repo, filename, cache_dir=cache_dir, revision=revision)
    if isinstance(cached, str):
        return cached
    cache = cache_dir or constants.HF_HUB_CACHE
    if not published:
        raise WeightsError(
            f'no published weights for {name} yet (its Hub repo {repo} has none) and none in the '
            f'Hugging Face cache {cache}.{train_hint(name)} {how_to_get_weights(name)}. '
            f'Published weights: {", ".join(sorted(load_manifest())) or "none yet"}.')
    if constants.is_offline_mode():
        raise WeightsError(
            f'{name}: HF_HUB_OFFLINE is set and {repo}/{filename} is not in the Hugging Face cache {cache}. '
            f'{how_to_get_weights(name)}.')
    try:
        get_hf_file_metadata(hf_hub_url(repo, filename, revision=revision), timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except (RepositoryNotFoundError, EntryNotFoundError) as e:
        raise WeightsError(f'the Hugging Face Hub has no {filename} in {repo} ({type(e).__name__}). '
                           f'{how_to_get_weights(name)}.') from e
    except Exception as e:  # connection refused, DNS, timeouts, proxies, server errors
        raise WeightsError(
            f'cannot reach the Hugging Face Hub ({constants.ENDPOINT}) to download {repo}/{filename}, and it '
            f'is not in the cache {cache} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}). '
            f'{how_to_get_weights(name)}.') from e
    return hf_hub_download(repo, filename, revision=revision, cache_dir=cache_dir)


def _hub_weights(repo_id: str, name: str, published: bool, cache_dir) -> Dict[str, Any]:
    path = hub_file(repo_id, name, published=published, cache_dir=cache_dir)
    recorded = load_manifest().get(name, {}).get('sha256')
    # A cache without symlinks holds copies under the file's own name: then the record is the digest to check.
    sha256 = _sha256_of_blob(path) or recorded
    try:
        state = load_state_dict(path, sha256=sha256)
    except WeightsError as e:
        raise WeightsError(f'the cached weights of {name} fail their check: {e} (or seed them again with '
                           f'`sd-zoo hub seed-cache`)') from e
    if recorded and recorded != sha256:
        raise WeightsError(f'cached weights of {name} ({path}) have sha256 {sha256}, but '
                           f'sd_zoo/weights/published.json records {recorded}: delete them from the cache and download '
                           f'or seed them again (`sd-zoo hub seed-cache`)')
    return state


def pretrained_state(variant: str, pretrained_cfg, pretrained_cfg_overlay: Optional[Dict],
                     cache_dir: Optional[PathLike] = None) -> Optional[Dict[str, Any]]:
    """The verified tensors ``create_model(..., pretrained=True)`` should load, before timm's loader runs.

    Fails fast with advice when the weights cannot be had, are corrupt, or would have to be unpickled.
    None where the caller hands over weights of their own (``state_dict`` or ``url`` in the overlay).
    """
    overlay = pretrained_cfg_overlay or {}
    if overlay.get('file'):
        return load_state_dict(overlay['file'])
    if overlay.get('state_dict') or overlay.get('url'):
        return None
    if pretrained_cfg is not None and not isinstance(pretrained_cfg, str):
        # A full cfg, from an ``hf-hub:`` or ``local-dir:`` model name (timm has read its config.json).
        cfg = pretrained_cfg if isinstance(pretrained_cfg, dict) else pretrained_cfg.to_dict()
        if cfg.get('source') == 'local-dir':
            weights = Path(cfg['file']) / WEIGHTS_FILE
            if not weights.is_file():
                # timm would fall back to pytorch_model.bin & co., i.e. unpickle
                raise WeightsError(f'{cfg["file"]} has no {WEIGHTS_FILE}; sd-zoo loads safetensors weights only')
            return load_state_dict(weights, shipped_sha256(weights))
        if cfg.get('source') == 'hf-hub' and cfg.get('hf_hub_id'):
            return _hub_weights(cfg['hf_hub_id'], _repo_name(cfg['hf_hub_id']), True, cache_dir)
        return None
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg, overlay)  # registered cfgs name no file
    if cfg.url or not cfg.hf_hub_id:
        return None
    name = f'{variant}.{cfg.tag}' if cfg.tag else variant
    return _hub_weights(cfg.hf_hub_id, name, name in load_manifest(), cache_dir)


def is_shipped(folder: PathLike) -> bool:
    """True for a folder of the checkout's hub_configs/, which the packaged manifest describes."""
    return Path(folder).resolve().parent == SHIPPED_DIR.resolve()


def shipped_sha256(weights: PathLike) -> Optional[str]:
    """The sha256 published.json records for a weights file of the checkout's hub_configs/, else None."""
    folder = Path(weights).resolve().parent
    return load_manifest().get(folder.name, {}).get('sha256') if is_shipped(folder) else None


def create_pretrained(model_name: str, **kwargs):
    """``timm.create_model(model_name, pretrained=True, **kwargs)`` that fails fast for ``hf-hub:`` names too.

    timm fetches an ``hf-hub:`` repo's config.json before any sd-zoo code runs, with huggingface_hub's
    retries; this probes it first. Registered names (``sd_resnet20.c10j75``) need no wrapper.
    """
    import timm
    if model_name.startswith('hf-hub:'):
        repo_id = model_name[len('hf-hub:'):]
        hub_file(repo_id, _repo_name(repo_id), filename='config.json', cache_dir=kwargs.get('cache_dir'))
    return timm.create_model(model_name, pretrained=True, **kwargs)


set_pretrained_reader(pretrained_state)
