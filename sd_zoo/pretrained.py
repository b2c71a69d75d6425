"""Pretrained-weight registry of sd-zoo: which tags have published weights, the settings they carry, and
the checks that make ``create_model(..., pretrained=True)`` fail fast with a message that says what to do.

Every pretrained tag has a full ``hf_hub_id`` in its model's default cfg (one Hub repo per model and
tag under :data:`HUB_ORG`). The packaged manifest ``published.json`` (written by ``sd-zoo hub build``)
lists each published ``model.tag`` with the sha256 of its ``model.safetensors`` and the stochastic-depth
settings it was trained with; :data:`PUBLISHED` and :data:`TAG_MODEL_ARGS` derive from it, so that
``create_model('name.tag', pretrained=True)`` rebuilds the network the weights were trained as (the Hub
repo's config.json carries the same ``model_args`` for ``hf-hub:`` names).

Weights are found in the Hugging Face cache (a download, or ``sd-zoo hub seed-cache`` from a checkout's
``hub_configs/``). When they are not cached, one short probe of the Hub decides: no retries, so that a
machine without network fails in seconds with a WeightsError rather than after a minute of back-off.
"""
import json
from pathlib import Path
from typing import Any, Dict, Optional, Union

from timm.models import get_pretrained_cfg, list_pretrained
from timm.models._builder import resolve_pretrained_cfg
from timm.models._hub import hf_split

from .checkpoint import PICKLE_SUFFIXES
from .errors import ConfigError, WeightsError

HUB_ORG = 'sd-zoo'
PAPER_ID = 'arXiv:1603.09382'
PAPER_NAME = 'Deep Networks with Stochastic Depth'
LICENSE = 'apache-2.0'
WEIGHTS_FILE = 'model.safetensors'

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

MANIFEST_PATH = Path(__file__).with_name('published.json')
# The checkout's folder of Hub repos (absent in an installed wheel); see ``sd-zoo hub seed-cache``.
SHIPPED_DIR = Path(__file__).resolve().parent.parent / 'hub_configs'

# Constant-depth baselines (tag suffix ``_cd``) are the same architectures trained with p_L = 1.
CONSTANT_DEPTH_SUFFIX = '_cd'
_CONSTANT_DEPTH_TAGS = ('sd_resnet20.c10j75_cd', 'sd_resnet56.c10j75_cd', 'sd_resnet110.c10j75_cd')


def load_manifest(path: Union[str, Path] = MANIFEST_PATH) -> Dict[str, Dict[str, Any]]:
    """``{'model.tag': {'sha256': ..., 'model_args': {...}}}`` of published weights ({} if no file)."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f'{path} is not valid JSON ({e}); restore it from version control') from e


def write_manifest_entry(name: str, sha256: str, model_args: Dict[str, Any],
                         path: Union[str, Path] = MANIFEST_PATH) -> None:
    """Record ``name`` as published (sorted, so that rebuilding one entry leaves a one-entry diff)."""
    path = Path(path)
    manifest = load_manifest(path)
    manifest[name] = dict(sha256=sha256, model_args=model_args)
    path.write_text(json.dumps(dict(sorted(manifest.items())), indent=2, sort_keys=True) + '\n')
    if path.resolve() == MANIFEST_PATH.resolve():  # keep this process's view in step with the file
        PUBLISHED.add(name)
        TAG_MODEL_ARGS[name] = dict(model_args)


MANIFEST = load_manifest()

# 'model.tag' of every weight that has been published.
PUBLISHED = set(MANIFEST)

# Model kwargs that weights of a tag were trained with, where they differ from the defaults.
TAG_MODEL_ARGS: Dict[str, Dict[str, Any]] = {name: dict(drop_path_rate=0.0) for name in _CONSTANT_DEPTH_TAGS}
TAG_MODEL_ARGS.update({name: dict(entry.get('model_args', {})) for name, entry in MANIFEST.items()})


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


def _repo_name(repo_id: str) -> str:
    """'sd-zoo/sd_resnet20.c10j75@rev' -> 'sd_resnet20.c10j75': sd-zoo names each repo after its model.tag."""
    return hf_split(repo_id)[0].split('/')[-1]


def how_to_get_weights(name: str) -> str:
    """The ways to obtain weights for ``name`` without the Hub, for error messages."""
    shipped = SHIPPED_DIR / name
    seed = (f'this checkout ships them in {shipped.name}/ under hub_configs/: run `sd-zoo hub seed-cache`'
            if (shipped / WEIGHTS_FILE).exists() else
            'seed the cache from a checkout that ships hub_configs/ with `sd-zoo hub seed-cache`')
    return (f'To load without network, {seed}, then set HF_HUB_OFFLINE=1; or pass a local file with '
            f"timm.create_model('{name}', pretrained=True, pretrained_cfg_overlay=dict(file='model.safetensors'))")


def refuse_pickle(path: Union[str, Path]) -> None:
    """timm would unpickle a .pth/.bin file; sd-zoo asks for safetensors unless the caller opts in."""
    if Path(path).suffix in PICKLE_SUFFIXES:
        raise WeightsError(
            f'{path} is a pickle-based checkpoint; sd-zoo loads pretrained weights from safetensors only, '
            f'since unpickling can run arbitrary code. Convert it where you trust it (safetensors.torch.save_file), '
            f'or load it explicitly with sd_zoo.checkpoint.load_weights(path, model_name, allow_pickle=True)')


def check_safetensors(path: Union[str, Path], what: str) -> None:
    """Read the header of a weights file, so that a truncated or foreign file fails with advice."""
    from .checkpoint import read_metadata
    try:
        read_metadata(path)
    except WeightsError as e:
        raise WeightsError(f'{what} {e}. Delete it and download or seed it again (`sd-zoo hub seed-cache`), '
                           f'or rebuild it with `sd-zoo hub build`') from e


def ensure_hub_file(repo_id: str, name: str, filename: str = WEIGHTS_FILE, published: bool = True,
                    cache_dir: Optional[Union[str, Path]] = None) -> None:
    """Make sure ``hf_hub_download(repo_id, filename)`` will succeed quickly, else raise WeightsError.

    A cached file is checked and accepted. Otherwise, unless offline mode forbids it, a single HEAD
    request without retries (huggingface_hub's back-off spends about 25 s on an unreachable Hub)
    tells whether the download can work.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    repo, revision = hf_split(repo_id)
    cached = try_to_load_from_cache(repo, filename, cache_dir=cache_dir, revision=revision)
    if isinstance(cached, str):
        if filename.endswith('.safetensors'):
            check_safetensors(cached, f'cached weights of {name}:')
        return
    cache = cache_dir or constants.HF_HUB_CACHE
    if not published:
        raise WeightsError(
            f'no published weights for {name} yet (its Hub repo {repo} has none) and none in the '
            f'Hugging Face cache {cache}. Train them with `sd-zoo train --model {name.split(".")[0]} ...`. '
            f'{how_to_get_weights(name)}. Published weights: {", ".join(sorted(PUBLISHED)) or "none yet"}.')
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


def check_weights_available(variant: str, pretrained_cfg, pretrained_cfg_overlay: Optional[Dict],
                            cache_dir: Optional[Union[str, Path]] = None) -> None:
    """Fail fast, before timm's loader runs, when ``pretrained=True`` cannot succeed or would unpickle."""
    overlay = pretrained_cfg_overlay or {}
    if overlay.get('file'):
        refuse_pickle(overlay['file'])
        return
    if overlay.get('state_dict') or overlay.get('url'):
        return  # the user hands over their own weights
    if pretrained_cfg is not None and not isinstance(pretrained_cfg, str):
        # A full cfg, from an ``hf-hub:`` or ``local-dir:`` model name (timm has read its config.json).
        cfg = pretrained_cfg if isinstance(pretrained_cfg, dict) else pretrained_cfg.to_dict()
        if cfg.get('source') == 'local-dir':
            weights = Path(cfg['file']) / WEIGHTS_FILE
            if not weights.is_file():
                # timm would fall back to pytorch_model.bin & co., i.e. unpickle
                raise WeightsError(f'{cfg["file"]} has no {WEIGHTS_FILE}; sd-zoo loads safetensors weights only')
            check_safetensors(weights, 'weights file')
        elif cfg.get('source') == 'hf-hub' and cfg.get('hf_hub_id'):
            ensure_hub_file(cfg['hf_hub_id'], _repo_name(cfg['hf_hub_id']), cache_dir=cache_dir)
        return
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg, overlay)
    name = f'{variant}.{cfg.tag}' if cfg.tag else variant
    if cfg.file:
        refuse_pickle(cfg.file)
        return
    if cfg.url or not cfg.hf_hub_id:
        return
    ensure_hub_file(cfg.hf_hub_id, name, published=name in PUBLISHED, cache_dir=cache_dir)


def create_pretrained(model_name: str, **kwargs):
    """``timm.create_model(model_name, pretrained=True, **kwargs)`` that fails fast for ``hf-hub:`` names too.

    timm fetches an ``hf-hub:`` repo's config.json before any sd-zoo code runs, with huggingface_hub's
    retries; this probes it first. Registered names (``sd_resnet20.c10j75``) need no wrapper.
    """
    import timm
    if model_name.startswith('hf-hub:'):
        repo_id = model_name[len('hf-hub:'):]
        ensure_hub_file(repo_id, _repo_name(repo_id), filename='config.json', cache_dir=kwargs.get('cache_dir'))
    return timm.create_model(model_name, pretrained=True, **kwargs)
