"""`sd-zoo hub`: turn a training run into a Hugging Face Hub repo folder, verify it, upload it, cache it.

A folder ``hub_configs/<model>.<tag>/`` holds exactly what goes to the Hub repo ``sd-zoo/<model>.<tag>``:

* ``config.json``: timm's layout (written by ``timm.models.save_for_hf``), whose ``model_args`` also carry
  the stochastic-depth settings (``model.sd_config()``) that timm's writer leaves out, so
  ``timm.create_model('hf-hub:sd-zoo/<model>.<tag>')`` rebuilds the trained network;
* ``model.safetensors``: the weights, with sd-zoo's metadata (``sd-zoo eval --checkpoint`` reads it);
* ``README.md``: the model card (``model_card.py``), ``survival_schedule.png`` and, when the run drew
  them, ``training_curves.png``.

Subcommands::

    sd-zoo hub build --run runs/r20            # -> hub_configs/sd_resnet20.c10j75/ (+ sd_zoo/weights/published.json)
    sd-zoo hub check                           # every shipped folder: config, weights, card, metrics
    sd-zoo hub push hub_configs/sd_resnet20.c10j75 --repo-id sd-zoo/sd_resnet20.c10j75 [--dry-run]
    sd-zoo hub seed-cache                      # hub_configs/* -> the Hugging Face cache, for offline loading

Metrics in a card come from evaluating the shipped weights when the folder is built (or, with
``--skip-eval``, from the run's summary); ``--limit N`` evaluates a class-balanced subset of N test images,
the same subset as ``sd-zoo train --test-subset N``.
"""
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import timm
from timm.models import get_pretrained_cfg, save_for_hf

from ..weights import checkpoint as ckpt, pretrained
from .. import data
from ..errors import ConfigError, SDZooError, WeightsError
from ..evaluation.evaluate import check_num_classes, count_params_macs, evaluate_model
from ..files import PICKLE_SUFFIXES, PathLike, new_file_mode, sha256_file
from ..models import tags
from ..weights.loader import load_model
from .model_card import (
    TAGS as CARD_TAGS, card_metrics, expected_metrics, read_card, recipe_rows, render_card
)
from ..evaluation.metrics_plot import read_metrics
from ..deploy.prune_curve import pruning_table
from ..evaluation.schedule_plot import plot_schedule

WEIGHTS = pretrained.WEIGHTS_FILE
SCHEDULE_PNG = 'survival_schedule.png'
CURVES_PNG = 'training_curves.png'
REQUIRED_FILES = ('config.json', WEIGHTS, 'README.md', SCHEDULE_PNG)
OPTIONAL_FILES = (CURVES_PNG,)
# pretrained_cfg fields of a folder's config.json that must agree with the registered cfg of its tag.
CFG_FIELDS = ('num_classes', 'input_size', 'mean', 'std', 'interpolation', 'crop_pct', 'first_conv', 'classifier')


def default_out() -> Path:
    """The checkout's hub_configs/ when running from a checkout, else ./hub_configs."""
    return pretrained.SHIPPED_DIR if pretrained.SHIPPED_DIR.parent.joinpath('pyproject.toml').exists() \
        else Path('hub_configs')


def shipped_folders() -> List[Path]:
    root = pretrained.SHIPPED_DIR
    return sorted(p for p in root.iterdir() if (p / 'config.json').is_file()) if root.is_dir() else []


def _read_json(path: Path, what: str) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f'{what} {path} not found') from None
    except ValueError as e:
        raise ConfigError(f'{what} {path} is not valid JSON ({e})') from None


def _data_facts(data_name: str) -> Dict[str, Any]:
    info = data.dataset_info(data_name)
    return dict(
        data=data_name, data_title=info.title, data_base_title=info.title.split(' (')[0],
        jpeg='jpeg' in data_name, dataset_hub_id='cifar100' if data_name.startswith('cifar100') else 'cifar10',
        dataset_config='jpeg75' if 'jpeg75' in data_name else None)


# --- evaluation ----------------------------------------------------------------------------------------

def measure(model, data_name: str, limit: Optional[int] = None) -> Dict[str, Any]:
    """Top-1/top-5 error on the test split, or on its class-balanced subset of ``limit`` images (the
    subset ``sd-zoo train --test-subset N`` reports on)."""
    result = evaluate_model(model, data_name, 'test', limit=limit)
    return dict(split='test', top1_err=result['top1_err'], top5_err=result['top5_err'], num_images=result['n'],
                limit=limit or None)


# --- build ---------------------------------------------------------------------------------------------

def _reproduce_command(run_dir: Path, run_info: Dict[str, Any], config: Dict[str, Any]) -> Tuple[str, str]:
    """The run's first recorded command and its output folder, absolute paths cut to their last part
    (cards are public); a minimal command from the config where the run recorded none."""
    commands = run_info.get('commands') or []
    output = f'runs/{run_dir.name}'
    if not commands:
        return shlex.join(['sd-zoo', 'train', '--model', str(config.get('model')), '--data', str(config.get('data')),
                           '--recipe', str(config.get('recipe')), '--output', output]), output
    tokens = []
    for token in shlex.split(commands[0]):
        key, eq, value = token.partition('=') if token.startswith('--') else ('', '', token)
        is_output = key == '--output' or tokens[-1:] == ['--output']
        if os.path.isabs(value):
            value = f'runs/{Path(value).name}' if is_output else Path(value).name
        if is_output and value:
            output = value
        tokens.append(f'{key}{eq}{value}')
    return shlex.join(tokens), output


def _duration(seconds: Optional[float]) -> Optional[str]:
    if seconds is None:
        return None
    return f'{seconds / 3600:.1f} h' if seconds >= 3600 else f'{seconds / 60:.1f} min'


# What a part of a run (its start, or a resume) records about the machine it trained on.
PART_FACTS = ('device', 'processor', 'threads', 'world_size', 'precision', 'torch')


def _training_parts(run_dir: Path, run_info: Dict[str, Any], final_epoch: Optional[int]) -> List[Dict[str, Any]]:
    """Where and how each stretch of the run's epochs trained, with the median training time of one epoch
    (without evaluation): the median, since epochs that shared the machine with other work take several
    times as long and would swamp a mean. Consecutive parts with the same facts are one stretch. A run.json
    older than ``parts`` describes the whole run in its top-level keys."""
    recorded = run_info.get('parts') or ([dict(run_info, first_epoch=1)] if run_info else [])
    stretches = []
    for part in recorded:
        facts = {k: part.get(k) for k in PART_FACTS}
        facts['precision'] = (facts['precision'] or '').removeprefix('precision: ') or None
        if not (stretches and {k: stretches[-1][k] for k in PART_FACTS} == facts):
            stretches.append(dict(facts, first_epoch=part['first_epoch']))
    times = [(row['epoch'], row['epoch_time_s']) for row in read_metrics(run_dir) if row.get('epoch_time_s')]
    for stretch, after in zip(stretches, stretches[1:] + [None]):
        stretch['last_epoch'] = after['first_epoch'] - 1 if after else final_epoch
        end = after['first_epoch'] if after else math.inf
        seconds = [t for epoch, t in times if stretch['first_epoch'] <= epoch < end]
        stretch['epoch_s'] = statistics.median(seconds) if seconds else None
    return stretches


def _arch_title(arch: str) -> str:
    doc = timm.models.model_entrypoint(arch).__doc__ or ''
    match = re.search(r'(CIFAR )?ResNet-\d+', doc)
    return match.group(0) if match else arch


def gather_facts(model, arch: str, tag: str, data_name: str, evaluation: Dict[str, Any], run_dir: Path,
                 checkpoint_name: str, sha256: str, curves: bool) -> Dict[str, Any]:
    """Everything the model card shows, from the model, its evaluation and the run's files."""
    summary = _read_json(run_dir / 'summary.json', 'run summary')
    run_info = _read_json(run_dir / 'run.json', 'run record') if (run_dir / 'run.json').exists() else {}
    config = dict(summary.get('config') or run_info.get('config') or {})
    cfg = model.pretrained_cfg
    params, macs = count_params_macs(model, tuple(cfg['input_size']))
    command, output = _reproduce_command(run_dir, run_info, config)
    parts = _training_parts(run_dir, run_info, summary.get('final_epoch'))
    return dict(
        name=f'{arch}.{tag}', arch=arch, tag=tag, repo_id=cfg['hf_hub_id'],
        arch_title=_arch_title(arch), num_blocks=model.num_blocks,
        stage_blocks=[len(getattr(model, f'layer{i + 1}')) for i in range(model.num_stages)],
        num_classes=model.num_classes, input_size=list(cfg['input_size']), mean=list(cfg['mean']),
        std=list(cfg['std']), params=params, macs=macs, sd=model.sd_config(), expected_depth=model.expected_depth,
        constant_depth=model.expected_depth == model.num_blocks, sha256=sha256,
        schedule_png=SCHEDULE_PNG, curves_png=CURVES_PNG if curves else None,
        val_size=config.get('val_size'), eval=evaluation,
        recipe=recipe_rows(config, amp_recorded=any(str(p['device']).startswith('cuda') or p['precision']
                                                    for p in parts)),
        reproduce_command=command,
        run=dict(
            checkpoint=checkpoint_name, dir_name=output, best_val_epoch=summary.get('best_val_epoch'),
            final_epoch=summary.get('final_epoch'), test_err_at_best_val=summary.get('test_err_at_best_val'),
            final_test_err=summary.get('final_test_err'), test_subset=config.get('test_subset'),
            total_time=_duration(summary.get('total_time_s')), parts=parts),
        **_data_facts(data_name))


def _summary_evaluation(run_dir: Path, summary: Dict[str, Any], checkpoint_name: str) -> Dict[str, Any]:
    """The test error the run itself measured for the shipped checkpoint (``--skip-eval``)."""
    config = summary.get('config') or {}
    if config.get('test_subset'):
        raise ConfigError(f'{run_dir} tested on a class-balanced subset of {config["test_subset"]} images; evaluate '
                          f'the weights instead of --skip-eval (add --limit {config["test_subset"]} for that subset)')
    key = 'test_err_at_best_val' if checkpoint_name == 'best.safetensors' else 'final_test_err'
    if summary.get(key) is None:
        raise ConfigError(f'{run_dir}/summary.json has no {key}; evaluate the weights instead of --skip-eval')
    return dict(split='test', top1_err=summary[key], top5_err=None, num_images=None, limit=None,
                measured_by='the training run (summary.json)')


def _tagged_model(checkpoint: Path, model_name: Optional[str], data_name: str, tag: Optional[str]):
    """The weights as the registered ``model.tag`` they are published as, after checking the two agree."""
    model = load_model(checkpoint, model_name=model_name)
    arch = model.pretrained_cfg['architecture']
    tag = tag or tags.tag_for(data_name, model.sd_config())
    name = f'{arch}.{tag}'
    registered = get_pretrained_cfg(name)
    if registered is None:
        raise ConfigError(f'{name} is not a registered pretrained tag; register it in the model file first '
                          f'(known: {", ".join(timm.list_pretrained(arch + ".*")) or "none"})')
    tag_data = tags.tag_info(tag).data
    if tag_data != data_name:
        raise ConfigError(f'{name} means weights trained on {tag_data}; these were trained on {data_name}')
    expected = timm.create_model(name).sd_config()
    if expected != model.sd_config():
        raise ConfigError(f'these weights were trained with {model.sd_config()}, but create_model("{name}") builds '
                          f'{expected}: give them a tag that means their settings (TAGS in sd_zoo/models/tags.py)')
    model.pretrained_cfg = model.default_cfg = registered.to_dict()
    return model, arch, tag


def build(run_dir: PathLike, checkpoint: Optional[PathLike] = None, model_name: Optional[str] = None,
          tag: Optional[str] = None, out: Optional[PathLike] = None, evaluate: bool = True,
          limit: Optional[int] = None, manifest: Optional[PathLike] = None, force: bool = False,
          pruning_rows: int = 7, progress: bool = False, note: Optional[str] = None) -> Path:
    """Write ``out/<model>.<tag>/`` from a folder written by ``sd-zoo train``; returns the folder.

    The arguments are those of ``sd-zoo hub build``; ``tag`` defaults to the tag of ``sd_zoo.models.tags.TAGS`` that
    means the weights' data and settings, ``manifest`` (a JSON file to record the weights in) to none.
    ``progress`` says each step on stderr, with a progress bar over the pruning table's depths. ``note`` is a
    paragraph for the card's training section: why the recipe departs from the usual one, with the measurement.
    """
    say = (lambda msg: print(f'hub build: {msg}', file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f'run folder {run_dir} not found')
    summary = _read_json(run_dir / 'summary.json', 'run summary')
    if not summary.get('final_epoch'):
        raise ConfigError(f'{run_dir} finished no epoch of training; there is nothing to publish')
    best = run_dir / 'best.safetensors'
    checkpoint = Path(checkpoint or (best if best.exists() else run_dir / 'final.safetensors'))
    data_name = ckpt.read_metadata(checkpoint).get('data') or summary.get('data')
    if not data_name:
        raise ConfigError(f'neither {checkpoint} nor the run summary says which data it was trained on')
    model, arch, tag = _tagged_model(checkpoint, model_name, data_name, tag)
    name = f'{arch}.{tag}'
    check_num_classes(name, model.num_classes, data_name)  # its card and label names describe that data
    out = Path(out) if out is not None else default_out()
    folder = out / name
    if folder.exists() and not force:
        raise ConfigError(f'{folder} already exists; pass --force to replace it with weights from {run_dir}')
    if evaluate:
        say(f'{name}: measuring the test error in fp32 on {limit or "all"} test images of {data_name}')
    evaluation = dict(measure(model, data_name, limit), measured_by='sd-zoo hub build') if evaluate \
        else _summary_evaluation(run_dir, summary, checkpoint.name)
    if evaluate and pruning_rows:
        say(f'{name}: pruning table, up to {pruning_rows} depths, each evaluated and timed with ONNX Runtime')
    pruning = pruning_table(model, data_name, limit=limit, rows=pruning_rows, progress=progress) \
        if evaluate and pruning_rows else []

    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{name}.', dir=out))  # built aside, then swapped in whole
    try:
        save_for_hf(model, tmp, model_config=dict(label_names=list(data.dataset_info(data_name).classes)),
                    model_args=model.sd_config(), safe_serialization=True)
        # Same tensors again, now with sd-zoo's metadata, so the file also stands alone (sd-zoo eval).
        ckpt.save_weights(model, tmp / WEIGHTS, arch, data=data_name, tag=tag)
        sha256 = sha256_file(tmp / WEIGHTS)
        plot_schedule(model, tmp / SCHEDULE_PNG, title=name)
        curves = (run_dir / 'curves.png').exists()
        if curves:
            shutil.copyfile(run_dir / 'curves.png', tmp / CURVES_PNG)
        facts = gather_facts(model, arch, tag, data_name, evaluation, run_dir, checkpoint.name, sha256, curves)
        facts.update(pruning=pruning, note=note.strip() if note else None)
        render_card(facts).save(tmp / 'README.md')
        for f in tmp.iterdir():
            os.chmod(f, new_file_mode())
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        os.chmod(folder, new_file_mode(0o777))  # mkdtemp made it private; the folder is meant to be shared
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if manifest is not None:
        pretrained.write_manifest_entry(name, dict(
            sha256=sha256, model_args=model.sd_config(), top1_err=round(evaluation['top1_err'], 2),
            num_images=evaluation['num_images']), manifest)
    return folder


# --- check ---------------------------------------------------------------------------------------------

def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    return a == b


def _metric_tolerance(card_pct: float, n_card: Optional[int], n_fresh: Optional[int], same_images: bool) -> float:
    """Rounding only when the same images were scored; else also 4 standard deviations of the difference
    between the card's error (on ``n_card`` images, when the card says) and the fresh one."""
    rounding = 0.005 + 1e-6
    if same_images or not n_fresh:
        return rounding
    p = min(max(card_pct / 100, 1e-3), 1 - 1e-3)
    return rounding + 400 * math.sqrt(p * (1 - p) * (1 / n_fresh + (1 / n_card if n_card else 0)))


def _check_files(folder: Path) -> List[str]:
    problems = [f'missing file {f}' for f in REQUIRED_FILES if not (folder / f).is_file()]
    for stray in sorted(folder.iterdir()):
        if stray.name not in REQUIRED_FILES + OPTIONAL_FILES:
            problems.append(f'unexpected file {stray.name} (a hub folder holds only {", ".join(REQUIRED_FILES)})'
                            + (': pickle weights are not shipped' if stray.suffix in PICKLE_SUFFIXES else ''))
    return problems


def _check_config(folder: Path, config: Dict[str, Any]) -> Tuple[List[str], Any]:
    """Problems of config.json against the registry, and the model its model_args build (None if none)."""
    arch, pcfg = config.get('architecture'), config.get('pretrained_cfg') or {}
    if not arch or not timm.is_model(arch):
        return [f'config.json: architecture {arch!r} is not a registered timm model (an sd-zoo model needs '
                f'`import sd_zoo`; known: {", ".join(timm.list_models("sd_*"))})'], None
    name = f'{arch}.{pcfg.get("tag")}'
    registered = get_pretrained_cfg(name)
    if registered is None:
        return [f'config.json: {name} is not a registered pretrained tag'], None
    problems = []
    if folder.name != name:
        problems.append(f'folder is named {folder.name} but holds {name}')
    if config.get('num_classes') != pcfg.get('num_classes'):
        problems.append(f'config.json: num_classes {config.get("num_classes")} disagrees with pretrained_cfg '
                        f'num_classes {pcfg.get("num_classes")}')
    for key in CFG_FIELDS:
        if not _same(pcfg.get(key), getattr(registered, key)):
            problems.append(f'config.json: pretrained_cfg {key} = {pcfg.get(key)!r}, but the registered cfg '
                            f'of {name} has {getattr(registered, key)!r}')
    try:
        model = timm.create_model(arch, pretrained=False, pretrained_cfg=pcfg.get('tag'),
                                  **(config.get('model_args') or {}))
    except (SDZooError, TypeError, ValueError) as e:
        return problems + [f'config.json: model_args do not build {arch}: {e}'], None
    expected = timm.create_model(name).sd_config()
    if model.sd_config() != expected:
        problems.append(f'config.json: model_args build {model.sd_config()}, but {name} means {expected} '
                        f'(sd_zoo.models.tags.TAGS)')
    return problems, model


def _check_weights(folder: Path, model, name: str) -> Tuple[List[str], Optional[str], bool]:
    """Problems of model.safetensors (verified load, manifest entry), its sha256, and whether it loaded."""
    weights = folder / WEIGHTS
    if not weights.is_file():
        return [], None, False
    sha256 = sha256_file(weights)
    problems = []
    try:
        ckpt.load_into(model, ckpt.load_state_dict(weights), source=f'{folder.name}/{WEIGHTS}')
    except WeightsError as e:
        problems.append(str(e))
    loaded = not problems
    # Wherever the folder lives: a folder named after a published model.tag would go up as that tag.
    entry = pretrained.load_manifest().get(name)
    if entry is None:
        if pretrained.is_shipped(folder):
            problems.append(f'{name} is shipped but not in sd_zoo/weights/published.json '
                            f'(rebuild it with sd-zoo hub build)')
    elif entry.get('sha256') != sha256:
        problems.append(f'sd_zoo/weights/published.json lists sha256 {entry.get("sha256")} for {name}, the file has '
                        f'{sha256}: not the published weights of {name}; to publish them as its new version, '
                        f"build them into the checkout's hub_configs/ (sd-zoo hub build --force), which records them")
    elif not _same(entry.get('model_args'), model.sd_config()):
        problems.append(f'sd_zoo/weights/published.json records model_args {entry.get("model_args")} for {name}, the '
                        f'folder builds {model.sd_config()}')
    return problems, sha256, loaded


def _check_card(folder: Path, name: str, sha256: Optional[str]):
    """Problems of the model card (README.md), and the card (None if unreadable)."""
    try:
        card = read_card(folder / 'README.md')
    except Exception as e:  # huggingface_hub raises ValueError or YAML errors for a broken front matter
        return [f'README.md: unreadable model card ({e})'], None
    meta = card.data.to_dict()
    block = meta.get('sd_zoo') or {}
    problems = []
    if meta.get('library_name') != 'timm' or not set(CARD_TAGS) <= set(meta.get('tags') or []):
        problems.append(f'README.md: front matter needs library_name: timm and the tags {", ".join(CARD_TAGS)}')
    if sha256 and block.get('weights_sha256') != sha256:
        problems.append(f'README.md: sha256 {block.get("weights_sha256")} in the card, but {WEIGHTS} has {sha256}')
    if sha256 and sha256 not in card.text:
        problems.append(f'README.md: the card text does not show the weights sha256 {sha256}')
    if f'{block.get("model")}.{block.get("tag")}' != name:
        problems.append(f'README.md: card describes {block.get("model")}.{block.get("tag")}, config.json {name}')
    for image in re.findall(r'!\[[^\]]*\]\(([^)\s]+)\)', card.text):
        if '://' not in image and not (folder / image).is_file():
            problems.append(f'README.md: shows {image}, which is not in the folder')
    metrics = card_metrics(card)
    if 'accuracy' not in metrics or 'top1_error' not in metrics:
        problems.append('README.md: model-index lacks the accuracy and top1_error results')
    elif abs(metrics['accuracy'] + metrics['top1_error'] - 100) > 0.011:
        problems.append(f'README.md: accuracy {metrics["accuracy"]} and top-1 error {metrics["top1_error"]} '
                        f'do not add up to 100')
    return problems, card


def _check_metrics(model, card, limit: Optional[int]) -> List[str]:
    """The card's metrics against a fresh evaluation of the weights."""
    block = card.data.to_dict().get('sd_zoo') or {}
    card_eval = block.get('eval') or {}
    metrics = card_metrics(card)
    if not metrics or not block.get('data'):
        return []
    limit = card_eval.get('limit') if limit is None else limit or None  # 0: every test image
    try:
        fresh = measure(model, block['data'], limit)
    except SDZooError as e:
        return [f'cannot evaluate ({e}); pass --skip-eval to check the rest']
    same_images = limit == card_eval.get('limit')
    problems = []
    for metric, value in expected_metrics(fresh).items():
        if metric not in metrics:
            continue
        tol = _metric_tolerance(metrics[metric], card_eval.get('num_images'), fresh['num_images'], same_images)
        if abs(metrics[metric] - value) > tol:
            where = 'the same images' if same_images else \
                f"{fresh['num_images']} images (the card's on {card_eval.get('num_images') or 'an unstated number'})"
            problems.append(f'README.md: {metric} {metrics[metric]} in the card, but a fresh evaluation on '
                            f'{where} gives {value} (tolerance {tol:.3f})')
    return problems


def check(folder: PathLike, evaluate: bool = True, limit: Optional[int] = None) -> List[str]:
    """Problems of a hub folder (empty list: it is fit to push): its files, config.json against the
    registry, the weights (verified bytes, strict load, manifest), the card, and the card's metrics."""
    folder = Path(folder)
    if not folder.is_dir():
        return [f'{folder} is not a folder']
    problems = _check_files(folder)
    if not (folder / 'config.json').is_file():
        return problems
    try:
        config = _read_json(folder / 'config.json', 'config')
    except ConfigError as e:
        return problems + [str(e)]
    found, model = _check_config(folder, config)
    problems += found
    if model is None:
        return problems
    name = f'{config["architecture"]}.{config["pretrained_cfg"]["tag"]}'
    found, sha256, loaded = _check_weights(folder, model, name)
    problems += found
    if not (folder / 'README.md').is_file():
        return problems
    found, card = _check_card(folder, name, sha256)
    problems += found
    if evaluate and card is not None and loaded:
        problems += _check_metrics(model, card, limit)
    return problems


# --- push ----------------------------------------------------------------------------------------------

def upload_files(folder: PathLike) -> List[str]:
    return [f for f in REQUIRED_FILES + OPTIONAL_FILES if (Path(folder) / f).is_file()]


def push(folder: PathLike, repo_id: str, private: bool = False, token: Optional[str] = None,
         dry_run: bool = False, endpoint: Optional[str] = None, commit_message: Optional[str] = None):
    """Upload a checked hub folder with ``HfApi.create_repo`` + ``upload_folder``; returns the CommitInfo.

    The folder must pass :func:`check` (without evaluation). ``dry_run`` returns the list of
    ``(file, size, sha256)`` that would go up, touching no network.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    problems = check(folder, evaluate=False)
    if problems:
        raise WeightsError(f'{folder} is not fit to push: {"; ".join(problems)}')
    files = upload_files(folder)
    if dry_run:
        return [(f, (folder / f).stat().st_size, sha256_file(folder / f)) for f in files]
    commit_message = commit_message or f'sd-zoo: {folder.name} (weights sha256 {sha256_file(folder / WEIGHTS)[:12]})'
    api = HfApi(endpoint=endpoint, token=token)
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type='model')
        return api.upload_folder(repo_id=repo.repo_id, folder_path=folder, allow_patterns=files, repo_type='model',
                                 commit_message=commit_message)
    except Exception as e:  # connection, authentication and server errors of huggingface_hub and requests
        first = str(e).strip().splitlines()[0] if str(e).strip() else ''
        raise WeightsError(f'could not push {folder} to {repo_id} on {api.endpoint} ({type(e).__name__}: {first}); '
                           f'check the network and your token (`hf auth login` or --token)') from e


# --- seed-cache ----------------------------------------------------------------------------------------

def seed_cache(folders: Sequence[PathLike], cache_dir: Optional[PathLike] = None) -> List[Path]:
    """Copy hub folders into the Hugging Face cache, as if downloaded from the repo registered for their tag;
    returns the snapshot folders.

    Layout of huggingface_hub: ``models--ORG--NAME/blobs/<hash>``, ``snapshots/<revision>/<file>`` (links to
    the blobs, copies where links are not possible) and ``refs/main`` naming the revision. The revision
    is a digest of the files, so reseeding the same folder changes nothing.
    """
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    cache = Path(cache_dir or constants.HF_HUB_CACHE).expanduser()
    snapshots = []
    for folder in map(Path, folders):
        problems = check(folder, evaluate=False)
        if problems:
            raise WeightsError(f'{folder} fails `sd-zoo hub check`, so it is not cached: {"; ".join(problems)}')
        repo_id = get_pretrained_cfg(folder.name).hf_hub_id  # check() made sure the folder is named after its model.tag
        files = {f: sha256_file(folder / f) for f in upload_files(folder)}
        revision = hashlib.sha1(''.join(f'{f}:{h}\n' for f, h in sorted(files.items())).encode()).hexdigest()
        storage = cache / repo_folder_name(repo_id=repo_id, repo_type='model')
        snapshot = storage / 'snapshots' / revision
        snapshot.mkdir(parents=True, exist_ok=True)
        (storage / 'blobs').mkdir(exist_ok=True)
        for f, digest in files.items():
            blob, link = storage / 'blobs' / digest, snapshot / f
            if not blob.exists():
                shutil.copyfile(folder / f, blob)
            link.unlink(missing_ok=True)
            try:
                link.symlink_to(os.path.relpath(blob, link.parent))
            except OSError:  # no symlinks (Windows without developer mode): huggingface_hub copies too
                shutil.copyfile(blob, link)
        (storage / 'refs').mkdir(exist_ok=True)
        (storage / 'refs' / 'main').write_text(revision)
        snapshots.append(snapshot)
    return snapshots
