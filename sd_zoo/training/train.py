"""`sd-zoo train`: train a stochastic-depth ResNet on CIFAR, with the paper's recipe or a fast one.

``train(config)`` runs data -> model -> optimizer -> epochs (train, validate, test, checkpoint) -> outputs
in-process; the command line only builds ``config``. Recipes (``RECIPES``) are dicts of defaults that every
flag overrides: ``paper`` is Huang et al. 2016, section 4; ``fast`` trains the same net in 60 epochs on a GPU
(warm-up then a linear decay to zero, which beats steps for short budgets; label smoothing and more weight
decay, as short schedules need more regularisation). The reported number is the test error at the epoch of
best validation error.

Outputs in ``--output DIR`` (rank 0 writes): ``final.safetensors``, ``best.safetensors``, ``metrics.jsonl``,
``summary.json``, ``run.json``, ``progress.json`` (epochs done, time left: ``sd_zoo.training.progress``),
``curves.png`` and ``checkpoint.pt``. The checkpoint is written atomically
every epoch with every RNG state; data order comes from (seed, epoch) and the lr from the step, so
``--resume`` after a crash, even SIGKILL mid-epoch, ends with the same weights bit for bit on the same
machine and thread count (CPU; cuDNN makes GPU runs reproducible only statistically); ``--resume --output
DIR`` needs no other flag, as the checkpoint records the run's settings, and refuses any flag that disagrees
with them (``RESUMABLE`` lists those that may change). ``--amp auto`` is chosen afresh at every start, so a
run resumed on other hardware trains at that hardware's best; ``run.json``'s ``parts`` record where and in
which precision each part of the run trained. ``--time-budget SECONDS`` fits the run into that
wall-clock time (``sd_zoo.training.time_budget``). Under ``torchrun`` (DDP) ``--batch-size`` is the global batch
and every rank draws the same gates, so all skip the same blocks (skipped blocks hand their parameters zero
gradients: DDP needs no ``find_unused_parameters``).
"""
import contextlib
import copy
import io
import itertools
import json
import math
import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import Dict, Optional

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.models import split_model_name_tag
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .. import data
from ..weights.checkpoint import save_weights, tensors_sha256
from ..errors import ConfigError, SDZooError
from ..evaluation.evaluate import evaluate, load_eval_split, model_logits_fn, resolve_device
from ..files import atomic_write, atomic_write_text, remove_stale_temps
from ..weights.loader import MODEL_ARG_NAMES, check_model_name, load_model
from ..evaluation.metrics_plot import plot_runs, read_metrics
from ..models.stochastic_depth import ResidualGateMixin
from . import time_budget
from .progress import progress_record
from ..ranges import COUNT, FRACTION, NON_NEGATIVE, POSITIVE, PROBABILITY, check_ranges, flag

RECIPES = {
    'paper': dict(
        epochs=500, batch_size=128, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4,
        decay_norm_and_bias=True, label_smoothing=0.0, warmup_epochs=0.0, schedule='step',
        milestones=(0.5, 0.75), gamma=0.1, amp='none', channels_last=False),
    'fast': dict(
        epochs=60, batch_size=512, lr=0.4, momentum=0.9, nesterov=True, weight_decay=5e-4,
        decay_norm_and_bias=False, label_smoothing=0.1, warmup_epochs=2.0, schedule='linear',
        milestones=(), gamma=0.1, amp='auto', channels_last=True),
}

# Settings outside the recipes. None for a stochastic-depth setting keeps the model's (or its tag's) own.
DEFAULTS = dict(
    model='sd_resnet110', data='cifar10', recipe='paper', output=None, pretrained=False, init_weights=None,
    **dict.fromkeys(MODEL_ARG_NAMES), seed=0, val_size=data.VAL_SIZE, train_subset=None, test_subset=None,
    max_steps=None, eval_every=1, eval_batch_size=1000, compile=False, num_threads=None, device=None,
    resume=False, quiet=False, debug_dump=None, time_budget=None, test_at_end=False,
)

# The allowed range of each numeric setting, for its flag and for train(config) alike.
BOUNDS = dict(
    epochs=COUNT, batch_size=COUNT, lr=POSITIVE, momentum=FRACTION, weight_decay=NON_NEGATIVE,
    label_smoothing=FRACTION, warmup_epochs=NON_NEGATIVE, milestones=PROBABILITY, gamma=POSITIVE, seed=NON_NEGATIVE,
    val_size=NON_NEGATIVE, train_subset=COUNT, test_subset=COUNT, max_steps=COUNT, eval_every=COUNT,
    eval_batch_size=COUNT, time_budget=POSITIVE, num_threads=COUNT,
)

# Settings a resumed run may change. Bit-exact resumes still need the same thread count and compile flag.
RESUMABLE = {'resume', 'quiet', 'num_threads', 'device', 'debug_dump', 'eval_batch_size', 'output',
              'eval_every', 'max_steps', 'compile'}


def resolve_config(overrides: Dict) -> Dict:
    """Defaults, then the recipe, then every override that is not None."""
    recipe = overrides.get('recipe') or DEFAULTS['recipe']
    if recipe not in RECIPES:
        raise ConfigError(f'unknown recipe {recipe!r}; choose one of {", ".join(RECIPES)}')
    unknown = set(overrides) - set(DEFAULTS) - set(RECIPES[recipe])
    if unknown:
        raise ConfigError(f'unknown training settings: {", ".join(sorted(unknown))}')
    cfg = dict(DEFAULTS, **RECIPES[recipe])
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    # Plain types only: the config goes into JSON files and a weights_only checkpoint.
    cfg['milestones'] = tuple(float(m) for m in cfg['milestones'])
    for key in ('output', 'debug_dump'):
        cfg[key] = str(cfg[key]) if cfg[key] is not None else None
    if not cfg['output']:
        raise ConfigError('an output directory is required (--output DIR)')
    if cfg['schedule'] not in ('step', 'cosine', 'linear'):
        raise ConfigError(f"unknown lr schedule {cfg['schedule']!r}; choose step, cosine or linear")
    if cfg['amp'] not in AMP_CHOICES:
        raise ConfigError(f"--amp must be one of {', '.join(AMP_CHOICES)}, got {cfg['amp']!r}")
    # Every numeric setting is checked before any work: a bad value ends the run at once, not after an epoch.
    check_ranges(cfg, BOUNDS)
    if cfg['pretrained'] and cfg['init_weights']:
        raise ConfigError('give --pretrained (the tag\'s weights) or --init-weights FILE, not both')
    return cfg


AMP_CHOICES = ('none', 'bf16', 'auto')


def native_bf16(device: torch.device) -> Optional[str]:
    """What computes bf16 natively on ``device`` (a CPU feature or the GPU), or None where it is emulated."""
    if device.type == 'cuda':
        return 'the GPU' if torch.cuda.is_bf16_supported(including_emulation=False) else None
    # Without these, oneDNN emulates bf16 with fp32 arithmetic plus conversions: slower than fp32 itself.
    for feature, probe in (('AMX', '_is_amx_tile_supported'), ('avx512_bf16', '_is_avx512_bf16_supported')):
        if getattr(torch.cpu, probe, lambda: False)():
            return feature
    return None


def processor_name(device: torch.device) -> str:
    """The GPU's or the CPU's model name, as a card quotes it beside the training time."""
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    import platform
    return platform.processor() or platform.machine()


def choose_precision(amp: str, device: torch.device) -> tuple:
    """``(amp, why)``: the autocast actually used for ``--amp`` on ``device`` ('bf16' or 'none') and one line
    saying why. ``auto`` takes bf16 only where it is computed natively; an explicit bf16 is always honoured."""
    native = native_bf16(device)
    if amp in ('auto', 'bf16') and native:
        return 'bf16', f'precision: bf16 autocast ({native} computes bf16 natively)'
    if amp == 'auto':
        return 'none', f'precision: fp32 (bf16 would be emulated on this {device.type}, which is slower)'
    if amp == 'bf16':
        return 'bf16', f'precision: bf16 autocast (emulated on this {device.type}: expect it slower than fp32)'
    return 'none', 'precision: fp32'


def lr_at(step: int, total_steps: int, steps_per_epoch: int, cfg: Dict) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then the schedule."""
    warmup = round(cfg['warmup_epochs'] * steps_per_epoch)
    if step < warmup:
        return cfg['lr'] * (step + 1) / warmup
    if cfg['schedule'] == 'step':
        return cfg['lr'] * cfg['gamma'] ** sum(step >= round(m * total_steps) for m in cfg['milestones'])
    t = (step - warmup) / max(1, total_steps - warmup)
    if cfg['schedule'] == 'cosine':
        return cfg['lr'] * 0.5 * (1 + math.cos(math.pi * t))
    return cfg['lr'] * (1 - t)


def build_optimizer(model: torch.nn.Module, cfg: Dict) -> torch.optim.SGD:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg['decay_norm_and_bias']:
        groups = [dict(params=params, weight_decay=cfg['weight_decay'])]
    else:  # BatchNorm scales/shifts and biases are the 1-d parameters
        groups = [dict(params=[p for p in params if p.ndim > 1], weight_decay=cfg['weight_decay']),
                  dict(params=[p for p in params if p.ndim <= 1], weight_decay=0.0)]
    # fused: one kernel per tensor instead of about five. On a busy CPU each op's thread barrier costs
    # more than its arithmetic: ResNet-110 measured 1.4 s per step unfused, 1.5 ms fused (2 loaded cores).
    return torch.optim.SGD(groups, lr=cfg['lr'], momentum=cfg['momentum'], nesterov=cfg['nesterov'], fused=True)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               label_smoothing: float, use_amp: bool) -> tuple:
    """One optimizer step on a batch; returns the loss and the logits, detached and still on the device."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=use_amp):
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), logits.detach()


def compile_branches(model: torch.nn.Module) -> int:
    """torch.compile each residual branch, compiling every distinct block shape once; returns the shape count.

    The gates are Python bools drawn outside the compiled code, so skipping never recompiles, and blocks of
    one shape share one graph. Dynamo keeps one cache per code object (``forward_branch``, shared by all
    blocks), so the limit of 8 entries is raised to fit every shape. Compiling the whole model instead breaks
    the graph at every gate draw (sd_resnet20: 17 graphs, about 2.4x slower than eager on CPU).
    """
    import torch._dynamo

    blocks = [m for m in model.modules() if isinstance(m, ResidualGateMixin)]
    shapes = {(type(b), tuple(tuple(p.shape) for p in b.parameters())) for b in blocks}
    # Per shape: training, evaluation (no grad), a batch-dynamic evaluation graph for a smaller last batch, a spare.
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 4 * len(shapes))
    for block in blocks:
        block.forward_branch = torch.compile(block.forward_branch)
    return len(shapes)


def create_model(cfg: Dict, num_classes: int, say=print) -> torch.nn.Module:
    """The network to train: ``cfg['model']`` (a tag brings its settings) with the run's stochastic-depth
    settings, initialised from the tag's weights (``pretrained``) or a weights file (``init_weights``).
    A different class count gets a fresh classifier; the rest of the weights are kept."""
    check_model_name(cfg['model'])
    model_args = {k: cfg[k] for k in MODEL_ARG_NAMES if cfg[k] is not None}
    source = cfg['init_weights'] or (cfg['model'] if cfg['pretrained'] else None)
    if source:
        model = load_model(source, **model_args)
        if model.num_classes != num_classes:
            say(f'{source}: {model.num_classes} classes -> {num_classes}: new classifier, the rest kept')
            model.reset_classifier(num_classes)
    else:
        tag = split_model_name_tag(cfg['model'])[1]
        if tag:
            say(f'NOTE: {cfg["model"]}: training from scratch with the settings of tag {tag}, not its weights '
                f'(add --pretrained to start from them)')
        model = timm.create_model(cfg['model'], num_classes=num_classes, **model_args)
    if not hasattr(model, 'set_gate_generator'):
        raise ConfigError(f"{cfg['model']} is not a stochastic-depth model; use one of the sd_* models")
    return model


def _take_output(out: Path):
    """Create the output folder and lock it for the run's life (an exclusive ``flock`` on ``out/.lock``,
    which the kernel drops when the process dies, so a crashed run never blocks the next one)."""
    import fcntl

    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / '.lock', 'a+')
    except OSError as e:
        raise ConfigError(f'cannot write to --output {out}: {e.strerror or e}; choose a writable folder') from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or 'unknown'
        lock.close()
        raise ConfigError(f'{out} is in use by another sd-zoo train (pid {holder}); '
                          f'wait for it to finish or choose another --output') from None
    lock.truncate(0)  # append mode: the pid is written at the (new) end
    lock.write(str(os.getpid()))
    lock.flush()
    remove_stale_temps(out)  # left by a run killed while writing
    return lock


def _checkpoint_to_resume(path: Path) -> Dict:
    if not path.is_file():
        raise ConfigError(f'--resume: {path.parent} holds no checkpoint.pt to resume from (a run cut short by '
                          f'--max-steps keeps none); leave out --resume and choose a new --output')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
        if not isinstance(ckpt, dict) or not {'model', 'optimizer', 'config', 'epoch'} <= set(ckpt):
            raise ValueError('not an sd-zoo training checkpoint')
    except Exception as e:  # torch raises many types for truncated, empty or foreign files
        first_line = str(e).splitlines()[0] if str(e) else ''
        raise ConfigError(f'--resume: {path} is unreadable ({type(e).__name__}: {first_line}); '
                          f'it may be truncated: start a new run with another --output') from None
    return ckpt


def _resumed_config(config: Dict, record: Dict, plan: Optional[Dict]) -> Dict:
    """The settings of a resumed run: the run's own ``record``, then each one given (not None) over it.

    A time-budgeted run (``plan``) keeps the epochs and warm-up it chose when it started: given as first
    asked for (the same command again), they are taken as the run's; any other value stays, to be refused."""
    given = {k: v for k, v in config.items() if v is not None}
    if plan:
        scale = plan['max_epochs'] / plan['epochs']
        asked = dict(epochs=plan['max_epochs'], warmup_epochs=record['warmup_epochs'] * scale)
        given = {k: v for k, v in given.items() if not (k in asked and math.isclose(v, asked[k]))}
    return dict(record, **given)


def _as_flag_value(value) -> str:
    if isinstance(value, bool):
        return 'on' if value else 'off'
    if isinstance(value, (list, tuple)):
        return ' '.join(map(str, value)) or '(none)'
    return '(not set)' if value is None else str(value)


def _refuse_changed_settings(cfg: Dict, record: Dict, config: Dict, out: Path) -> None:
    """A ConfigError naming every setting of ``cfg`` that differs from the run's ``record``, outside
    ``RESUMABLE``; each is shown as given (``config``)."""
    keys = (set(cfg) | set(record)) - RESUMABLE
    # A setting newer than the checkpoint counts as its default there.
    changed = [f"{flag(k)} {_as_flag_value(cfg.get(k) if config.get(k) is None else config[k])} "
               f"differs from the run's {_as_flag_value(record.get(k, DEFAULTS.get(k)))}"
               for k in sorted(keys) if record.get(k, DEFAULTS.get(k)) != cfg.get(k)]
    if changed:
        raise ConfigError(f'{out} was trained with other settings: {", ".join(changed)}; leave them out '
                          f'(--resume continues with the run\'s own) or start a new --output')


def _undo_if_refused(out: Path):
    """An exit callback for a new run in ``out``: when the run is refused (an SDZooError before its first
    checkpoint) it removes what the run created, so that nothing is left behind: the lock and records it
    wrote, then the folders it made for ``out``. Only those: another run may be writing beside it."""
    made = [d for d in (out, *out.parents) if not d.exists()]  # innermost first
    files = [out / name for name in ('.lock', 'run.json', 'metrics.jsonl') if not (out / name).exists()]

    def undo(exc_type, exc, tb) -> bool:
        if exc_type and issubclass(exc_type, SDZooError) and not (out / 'checkpoint.pt').exists():
            for path in files:
                path.unlink(missing_ok=True)
            for folder in made:
                with contextlib.suppress(OSError):  # not empty: someone else's files are in it
                    folder.rmdir()
        return False  # the error itself goes on to the caller
    return undo


def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + '\n')


def _pct(v: Optional[float]) -> str:
    return '-' if v is None else f'{v:.2f}%'


def _min_over_ranks(value: int, device: torch.device, world_size: int) -> int:
    """The smallest ``value`` of all ranks, so that every rank takes the same decision."""
    if world_size == 1:
        return value
    t = torch.tensor(value, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def _plan_time_budget(cfg: Dict, model: torch.nn.Module, loader, eval_sets: Dict, logits_fn_of, device: torch.device,
                      use_amp: bool, started: float, world_size: int) -> Dict:
    """Time training steps, evaluation and a checkpoint on a copy of the model, then choose the epochs.

    The copy has its own gate generator and optimizer, so the run itself starts exactly as it would without
    a budget: ``--time-budget`` trains like ``--epochs N`` with the N it chose. Under DDP all ranks take the
    smallest choice.
    """
    probe = copy.deepcopy(model).train()
    probe.set_gate_generator(torch.Generator().manual_seed(cfg['seed']))
    if cfg['compile']:
        compile_branches(probe)  # compiled graphs are cached per shape, so the run reuses them
    optimizer = build_optimizer(probe, cfg)
    batches = itertools.chain.from_iterable(map(loader.epoch, itertools.count()))
    sync = torch.cuda.synchronize if device.type == 'cuda' else None
    budget, t0 = cfg['time_budget'], time.perf_counter()
    step_s, steps = time_budget.time_calls(
        lambda: train_step(probe, optimizer, *next(batches), cfg['label_smoothing'], use_amp),
        time_budget.WARMUP_STEPS, min_calls=5, min_seconds=min(max(0.02 * budget, 0.5), 10.0), sync=sync)
    logits_fn = logits_fn_of(probe)
    images = next(iter(eval_sets.values()))[0][:cfg['eval_batch_size']]
    batch_s, _ = time_budget.time_calls(lambda: logits_fn(images), warmup=1, sync=sync)
    eval_s = batch_s / len(images) * sum(len(y) for _, y in eval_sets.values()) / world_size
    state = dict(model=probe.state_dict(), optimizer=optimizer.state_dict())
    save_s, _ = time_budget.time_calls(lambda: torch.save(state, io.BytesIO()))
    with contextlib.suppress(ImportError):  # the curves plot needs matplotlib: its import (seconds) is set-up
        import matplotlib.figure  # noqa: F401
    epoch_s = step_s * len(loader) + 2 * save_s  # checkpoint.pt and best.safetensors every epoch
    setup_s = t0 - started
    spent = time.perf_counter() - started
    epochs = time_budget.plan_epochs(budget * (1 - time_budget.SAFETY) - spent - time_budget.TAIL_S,
                                     epoch_s, eval_s, cfg['eval_every'], cfg['epochs'])
    epochs = _min_over_ranks(epochs, device, world_size)
    if epochs < 1:
        one = time_budget.epochs_cost(1, epoch_s, eval_s, 1)
        need = (spent + one + time_budget.TAIL_S) / (1 - time_budget.SAFETY)
        raise ConfigError(f'--time-budget {budget:g} fits no epoch: set-up took {spent:.0f} s and one epoch takes '
                          f'about {one:.0f} s with evaluation; give at least {math.ceil(need)} s, or fewer images '
                          f'(--train-subset)')
    return dict(
        budget_s=budget, epochs=epochs, max_epochs=cfg['epochs'], setup_s=setup_s, probe_s=spent - setup_s,
        probe_steps=steps, step_s=step_s, images_per_s=cfg['batch_size'] / step_s, epoch_s=epoch_s, eval_s=eval_s,
        planned_s=spent + time_budget.epochs_cost(epochs, epoch_s, eval_s, cfg['eval_every']) + time_budget.TAIL_S,
        stopped_early=False)


def train(config: Dict, command: Optional[str] = None, started: Optional[float] = None) -> Dict:
    """Train as ``config`` says (keys: see DEFAULTS and RECIPES) and return the summary dict.

    ``started``: the ``time.perf_counter()`` from which ``time_budget`` counts (default: now).
    """
    with contextlib.ExitStack() as run_scope:  # holds the output folder's lock until the run ends or fails
        return _train(config, command, started, run_scope)


def _train(config: Dict, command: Optional[str], started: Optional[float], run_scope: contextlib.ExitStack) -> Dict:
    started = time.perf_counter() if started is None else started
    cfg = resolve_config(config)
    out = Path(cfg['output'])
    ckpt_path = out / 'checkpoint.pt'
    ckpt = _checkpoint_to_resume(ckpt_path) if cfg['resume'] else None
    if ckpt:
        cfg = resolve_config(_resumed_config(config, ckpt['config'], ckpt.get('time_budget')))
    check_model_name(cfg['model'])
    if cfg['init_weights'] and not Path(cfg['init_weights']).is_file():
        raise ConfigError(f"--init-weights {cfg['init_weights']}: no such file")
    device, rank, world_size = _start_processes(cfg)
    if cfg['batch_size'] % world_size:
        raise ConfigError(f"--batch-size {cfg['batch_size']} is the global batch; it must divide by {world_size} ranks")
    main = rank == 0
    say = print if main and not cfg['quiet'] else (lambda *a: None)
    if not cfg['resume'] and (ckpt_path.exists() or (out / 'final.safetensors').exists()):
        raise ConfigError(f'{out} already holds a run; pass --resume to continue it, or choose another --output')
    if ckpt:
        _refuse_changed_settings(cfg, ckpt['config'], config, out)
    # ``auto`` is chosen afresh at every start, so a run resumed on other hardware goes at that hardware's
    # speed; ``parts`` records what each part used. An explicit bf16 or none holds for the whole run.
    amp, precision = choose_precision(cfg['amp'], device)
    use_amp, channels_last = amp == 'bf16', cfg['channels_last']

    info = data.dataset_info(cfg['data'])
    loader, eval_sets = _load_data(cfg, info, device, rank, world_size)
    steps_per_epoch = len(loader)

    # Model: identical initial weights and gate generator on every rank.
    torch.manual_seed(cfg['seed'])
    model = create_model(cfg, info.num_classes, say)
    say(f"stochastic depth: {model.sd_config()}, expected depth {model.expected_depth:.2f} "
        f"of {model.num_blocks} blocks")
    say(precision + (', channels_last' if channels_last else ''))
    # Stored beside the weights: what they were trained on and what they started from.
    weights_meta = dict(data=cfg['data'], recipe=cfg['recipe'],
                        init_from=cfg['init_weights'] and Path(cfg['init_weights']).name or
                        (cfg['model'] if cfg['pretrained'] else 'random initialisation'))
    gate_generator = torch.Generator().manual_seed(cfg['seed'])
    model.set_gate_generator(gate_generator)
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    optimizer = build_optimizer(model, cfg)
    logits_fn_of = partial(model_logits_fn, mean=info.mean, std=info.std, channels_last=channels_last, amp=use_amp)

    start_epoch, step, best, elapsed, commands, parts, budget, deadline = 0, 0, None, 0.0, [], [], None, None
    best_state = None  # --test-at-end: the best-validation weights, tested once the run ends
    if main:
        undo = None if ckpt else _undo_if_refused(out)  # notes what is there before the folder is taken
        run_scope.enter_context(_take_output(out))  # locked until the run ends (or its process dies)
        if undo:  # armed only once the lock is held: until then the files may be another run's
            run_scope.push(undo)
    if ckpt:
        model.load_state_dict(ckpt['model'])
        optimizer.load_state_dict(ckpt['optimizer'])
        start_epoch, step, best, elapsed = ckpt['epoch'], ckpt['step'], ckpt['best'], ckpt['elapsed']
        best_state = ckpt.get('best_model')
        torch.set_rng_state(ckpt['rng']['torch'])
        gate_generator.set_state(ckpt['rng']['gate'])
        if device.type == 'cuda' and 'cuda' in ckpt['rng']:
            torch.cuda.set_rng_state_all(ckpt['rng']['cuda'])
        # A resumed run keeps the plan its first part made, and has no deadline of its own.
        commands, parts, budget = list(ckpt['commands']), list(ckpt.get('parts', [])), ckpt.get('time_budget')
    elif cfg['time_budget']:
        budget = _plan_time_budget(cfg, model, loader, eval_sets, logits_fn_of, device, use_amp, started, world_size)
        # The whole schedule (warm-up included) is compressed into the epochs that fit.
        cfg['warmup_epochs'] *= budget['epochs'] / cfg['epochs']
        cfg['epochs'] = budget['epochs']
        deadline = time_budget.Deadline(cfg['time_budget'], started, budget['epoch_s'], budget['eval_s'])
        say(f"time budget {budget['budget_s']:g} s: {budget['epochs']} epochs (at most {budget['max_epochs']}), "
            f"{budget['images_per_s']:.0f} img/s and {budget['eval_s']:.1f} s per evaluation in the probe, "
            f"about {budget['planned_s']:.0f} s in all")
    total_steps = cfg['epochs'] * steps_per_epoch
    # Only the epochs in the checkpoint: a crash may have logged one more.
    history = [row for row in read_metrics(out) if row['epoch'] <= start_epoch] if start_epoch else []
    if main:
        commands.append(command or f'train({cfg!r})')
        parts.append(dict(first_epoch=start_epoch + 1, amp=amp, precision=precision, device=str(device),
                          processor=processor_name(device), threads=torch.get_num_threads(),
                          world_size=world_size, torch=str(torch.__version__)))
        _write_json(out / 'run.json', dict(commands=commands, config=cfg, model_args=model.sd_config(),
                                           init_from=weights_meta['init_from'], parts=parts, time_budget=budget))
        atomic_write(out / 'metrics.jsonl', lambda p: p.write_text(''.join(json.dumps(r) + '\n' for r in history)))
    if cfg['compile']:
        compile_branches(model)
    ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None) \
        if world_size > 1 else model

    show_progress = main and not cfg['quiet'] and sys.stderr.isatty()
    say(f"sd-zoo train: {cfg['model']} on {info.title}, recipe {cfg['recipe']}, {len(loader.labels)} training "
        f"images, {steps_per_epoch} steps/epoch, {world_size} process(es) on {device}"
        + (f', resuming after epoch {start_epoch}' if start_epoch else ''))
    gates_log, stop = [], False
    for epoch in range(start_epoch, cfg['epochs']):
        model.train()
        model.reset_block_stats()
        loss_sum = torch.zeros((), device=device)
        wrong = torch.zeros((), device=device)
        seen = steps = 0
        t0 = time.perf_counter()
        for x, y in tqdm(loader.epoch(epoch), total=steps_per_epoch, disable=not show_progress,
                         desc=f"epoch {epoch + 1}/{cfg['epochs']}", leave=False):
            lr = lr_at(step, total_steps, steps_per_epoch, cfg)
            for group in optimizer.param_groups:
                group['lr'] = lr
            loss, logits = train_step(ddp_model, optimizer, x, y, cfg['label_smoothing'], use_amp)
            # Accumulated on the device: no host sync inside the loop.
            loss_sum += loss * len(y)
            wrong += (logits.argmax(1) != y).sum()
            seen += len(y)
            step += 1
            steps += 1
            if cfg['debug_dump']:
                gates_log.append(model.last_gates)
            if cfg['max_steps'] and step >= cfg['max_steps']:
                stop = True
                break
        if device.type == 'cuda':
            torch.cuda.synchronize()
        epoch_time = time.perf_counter() - t0
        totals = torch.stack([loss_sum.double(), wrong.double(), torch.tensor(float(seen), device=device).double()])
        if world_size > 1:
            dist.all_reduce(totals)
            # Each rank's BatchNorm statistics saw only its slices: average them (timm's --dist-bn reduce)
            # so that evaluation, the checkpoint and every rank hold the same model.
            for buf in model.buffers():
                if buf.is_floating_point():
                    dist.all_reduce(buf)
                    buf /= world_size
        last = stop or epoch + 1 == cfg['epochs']
        if deadline and not last and not _min_over_ranks(int(deadline.fits_another(t0)), device, world_size):
            stop = last = budget['stopped_early'] = True
            say(f"time budget: stopping after epoch {epoch + 1} of {cfg['epochs']}; the next would end after "
                f"{cfg['time_budget']:g} s")
        evaluated = (epoch + 1) % cfg['eval_every'] == 0 or last
        # --test-at-end: the paper's protocol needs the test error of the final and best-validation weights only.
        errs = {k: evaluate(logits_fn_of(model), x, y, cfg['eval_batch_size'], rank, world_size)['top1_err']
                for k, (x, y) in eval_sets.items() if evaluated and (k != 'test' or last or not cfg['test_at_end'])}
        elapsed += time.perf_counter() - t0
        loss_total, wrong_total, seen_total = totals.tolist()
        row = dict(
            epoch=epoch + 1, step=step, train_loss=loss_total / seen_total, train_err=100 * wrong_total / seen_total,
            val_err=errs.get('val'), test_err=errs.get('test'), lr=lr, epoch_time_s=epoch_time,
            images_per_s=seen_total / epoch_time, blocks_executed_measured=model.block_stats()['executed'] / steps,
            blocks_expected=model.expected_depth)
        history.append(row)
        improved = row['val_err'] is not None and (best is None or row['val_err'] < best['val_err'])
        if improved:
            best = dict(epoch=epoch + 1, val_err=row['val_err'], test_err=row['test_err'])
            if cfg['test_at_end']:
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if main:
            with open(out / 'metrics.jsonl', 'a') as f:
                f.write(json.dumps(row) + '\n')
            _write_json(out / 'progress.json', progress_record(out, history, cfg['epochs'], finished=False,
                                                              part_start=start_epoch + 1))
            if improved:
                save_weights(model, out / 'best.safetensors', cfg['model'], **weights_meta)
            if steps == steps_per_epoch:  # a cut-short epoch (--max-steps) cannot be resumed from
                state = dict(
                    model=model.state_dict(), optimizer=optimizer.state_dict(), epoch=epoch + 1, step=step,
                    best=best, elapsed=elapsed, config=cfg, commands=commands, parts=parts, time_budget=budget,
                    **(dict(best_model=best_state) if best_state is not None else {}), rng=_rng_states(gate_generator, device))
                atomic_write(ckpt_path, partial(torch.save, state))
            say(f"epoch {epoch + 1}/{cfg['epochs']}  loss {row['train_loss']:.4f}  train {_pct(row['train_err'])}  "
                f"val {_pct(row['val_err'])}  test {_pct(row['test_err'])}  lr {lr:.4g}  "
                f"{row['images_per_s']:.0f} img/s  blocks {row['blocks_executed_measured']:.2f}"
                f"/{row['blocks_expected']:.2f} expected")
        if stop:
            break

    best = _test_best_weights(model, best, best_state, eval_sets, logits_fn_of, cfg, rank, world_size)
    summary = _summary(cfg, info, history, best, step, elapsed, model, budget, started)
    if main:
        _write_outputs(out, model, summary, weights_meta, say)
        _write_json(out / 'progress.json', progress_record(out, history, cfg['epochs'], finished=True,
                                                          part_start=start_epoch + 1))
    if cfg['debug_dump']:
        _write_debug_dump(Path(cfg['debug_dump']), rank, world_size, gates_log, model)
    if world_size > 1:
        dist.destroy_process_group()
    return summary


def _start_processes(cfg: Dict) -> tuple:
    """``(device, rank, world_size)``: this process's device, and its place among torchrun's processes."""
    rank, world_size = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))  # set by torchrun
    device = resolve_device(cfg['device'])
    if device.type == 'cuda' and world_size > 1:
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # fixed shapes: autotuned convolutions pay off at once
    if cfg['num_threads']:
        torch.set_num_threads(cfg['num_threads'])
    return device, rank, world_size


def _load_data(cfg: Dict, info, device: torch.device, rank: int, world_size: int) -> tuple:
    """The training loader and the evaluation sets on the device: the paper's 45k/5k split of the training
    set (optionally a class-balanced subset of it) and the test split."""
    if 'test' not in info.splits:
        raise ConfigError(f"{cfg['data']} has no test split; train on one of {', '.join(trainable_datasets())}")
    x_train, y_train = data.load_split(cfg['data'], 'train')
    x_test, y_test = load_eval_split(cfg['data'], 'test', cfg['test_subset'])
    train_idx, val_idx = data.train_val_split(len(y_train), cfg['val_size'])
    if cfg['train_subset']:
        train_idx = data.balanced_subset(y_train, train_idx, cfg['train_subset'])
    loader = data.Loader(x_train[train_idx], y_train[train_idx], cfg['batch_size'], info.mean, info.std,
                         train=True, seed=cfg['seed'], device=device, rank=rank, world_size=world_size,
                         channels_last=cfg['channels_last'])
    if len(loader) == 0:
        raise ConfigError(f"{len(train_idx)} training images make no full batch of {cfg['batch_size']}")
    eval_sets = {'val': (x_train[val_idx], y_train[val_idx]), 'test': (x_test, y_test)}
    return loader, {k: (torch.as_tensor(x).to(device), torch.as_tensor(y).to(device))
                    for k, (x, y) in eval_sets.items() if len(y)}


def _rng_states(gate_generator: torch.Generator, device: torch.device) -> Dict:
    """Every random state the run draws from, for a bit-exact resume."""
    return dict(torch=torch.get_rng_state(), gate=gate_generator.get_state(),
                **(dict(cuda=torch.cuda.get_rng_state_all()) if device.type == 'cuda' else {}))


def _test_best_weights(model, best: Optional[Dict], best_state: Optional[Dict], eval_sets: Dict, logits_fn_of,
                       cfg: Dict, rank: int, world_size: int) -> Optional[Dict]:
    """``best`` with the test error of the best-validation weights, measured now where the run tested only
    at its end (``--test-at-end``)."""
    if best and best['test_err'] is None and 'test' in eval_sets and best_state is not None:
        best_model = copy.deepcopy(model)
        best_model.load_state_dict(best_state)
        best = dict(best, test_err=evaluate(logits_fn_of(best_model), *eval_sets['test'], cfg['eval_batch_size'],
                                            rank, world_size)['top1_err'])
    return best


def _summary(cfg: Dict, info, history, best: Optional[Dict], step: int, elapsed: float, model, budget,
             started: float) -> Dict:
    final = history[-1] if history else {}
    return dict(
        model=cfg['model'], data=cfg['data'], data_title=info.title, recipe=cfg['recipe'],
        best_val_epoch=best and best['epoch'], best_val_err=best and best['val_err'],
        test_err_at_best_val=best and best['test_err'], final_epoch=final.get('epoch'),
        final_val_err=final.get('val_err'), final_test_err=final.get('test_err'), steps=step,
        total_time_s=elapsed, expected_depth=model.expected_depth, model_args=model.sd_config(), config=cfg,
        time_budget=budget and dict(budget, epochs_run=final.get('epoch'), wall_s=time.perf_counter() - started))


def _write_outputs(out: Path, model, summary: Dict, weights_meta: Dict, say) -> None:
    """The final weights, the summary and the curves of a finished run."""
    save_weights(model, out / 'final.safetensors', summary['model'], **weights_meta)
    _write_json(out / 'summary.json', summary)
    try:
        plot_runs([out], out / 'curves.png')
    except ImportError as e:  # matplotlib is needed for the plot only, not for training
        say(f'NOTE: curves.png not drawn ({e})')
    if summary['test_err_at_best_val'] is not None:
        say(f"test error at best validation epoch {summary['best_val_epoch']}: {summary['test_err_at_best_val']:.2f}% "
            f"(final {summary['final_test_err']:.2f}%) on {summary['data_title']}")


def _write_debug_dump(dump_dir: Path, rank: int, world_size: int, gates_log, model) -> None:
    dump_dir.mkdir(parents=True, exist_ok=True)
    _write_json(dump_dir / f'rank{rank}.json', dict(
        rank=rank, world_size=world_size, gates=gates_log,
        params={k: tensors_sha256({k: v}) for k, v in model.state_dict().items()}))


def trainable_datasets() -> list:
    return [n for n, i in data.DATASETS.items() if 'test' in i.splits]
