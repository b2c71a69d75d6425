"""`sd-zoo train`: train a stochastic-depth ResNet on CIFAR, with the paper's recipe or a fast one.

One straight path: data -> model -> optimizer -> epochs (train, validate, test, checkpoint) -> outputs.
``train(config)`` does it in-process; the command line only builds ``config``.

Recipes are plain dicts of defaults; every flag given on the command line overrides them.

* ``paper`` (Huang et al. 2016, section 4): SGD with Nesterov momentum 0.9, weight decay 1e-4 on every
  parameter, batch 128, lr 0.1 divided by 10 at 50 % and 75 % of training (epochs 250 and 375 of 500),
  45k/5k train/validation split, pad-4 crop + flip. The reported number is the test error at the epoch
  of best validation error.
* ``fast``: the same net and augmentation in 60 epochs (meant for a GPU): batch 512 with the linearly
  scaled lr 0.4, 2 warm-up epochs then a linear decay to zero (a one-cycle triangle, which reaches a
  lower error than steps for short budgets), label smoothing 0.1, weight decay 5e-4 (short schedules
  need more regularisation) except on BatchNorm and biases, and on CUDA bf16 autocast plus
  channels_last (both ignored on CPU).

Outputs in ``--output DIR`` (rank 0 writes): ``final.safetensors`` and ``best.safetensors`` (weights
at the best validation epoch, absent with ``--val-size 0``), both with metadata ``sd_zoo.model``,
``sd_zoo.sd_config``, ``sd_zoo.num_classes``, ``sd_zoo.data``, ``sd_zoo.recipe``; ``metrics.jsonl``
(one line per epoch), ``summary.json``, ``run.json`` (command lines and resolved config),
``curves.png`` (paper Figure 3 layout) and ``checkpoint.pt``.

``checkpoint.pt`` is written atomically after every epoch and holds everything the rest of the run
depends on: weights and BatchNorm statistics, optimizer momentum, step, best validation so far and
every RNG state (torch CPU, CUDA, the gate generator; numpy's and Python's are not used). Data order
and augmentation come from a generator seeded by (seed, epoch), and the lr is a function of the step
(that is the whole scheduler state), so ``--resume`` after a crash, even SIGKILL mid-epoch, ends with
the same weights bit for bit as an uninterrupted run on the same machine and thread count (on CPU;
cuDNN's autotuning and atomics make GPU runs reproducible only statistically). It is read with
``torch.load(weights_only=True)``: nothing is unpickled.

Under ``torchrun --nproc_per_node N`` (DDP; NCCL on GPU, gloo on CPU) ``--batch-size`` is the global
batch: every rank draws the same shuffled batch and keeps its slice, and every rank's gate generator
has the same seed, so all ranks skip the same blocks (skipped blocks hand their parameters zero
gradients, so DDP needs no ``find_unused_parameters``).
"""
import argparse
import hashlib
import json
import math
import os
import shlex
import sys
import time
from functools import partial
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import data
from .checkpoint import save_weights
from .errors import ConfigError
from .evaluate import evaluate, load_eval_split, model_logits_fn
from .metrics_plot import plot_runs, read_metrics

RECIPES = {
    'paper': dict(
        epochs=500, batch_size=128, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4,
        decay_norm_and_bias=True, label_smoothing=0.0, warmup_epochs=0.0, schedule='step',
        milestones=(0.5, 0.75), gamma=0.1, amp='none', channels_last=False),
    'fast': dict(
        epochs=60, batch_size=512, lr=0.4, momentum=0.9, nesterov=True, weight_decay=5e-4,
        decay_norm_and_bias=False, label_smoothing=0.1, warmup_epochs=2.0, schedule='linear',
        milestones=(), gamma=0.1, amp='bf16', channels_last=True),
}

# Settings outside the recipes. None for sd_schedule / sd_gate / sd_rule keeps the model's default.
DEFAULTS = dict(
    model='sd_resnet110', data='cifar10', recipe='paper', output=None,
    drop_path_rate=0.5, sd_schedule=None, sd_gate=None, sd_rule=None,
    seed=0, val_size=data.VAL_SIZE, train_subset=None, test_subset=None, max_steps=None,
    eval_every=1, eval_batch_size=1000, compile=False, num_threads=None, device=None,
    resume=False, quiet=False, debug_dump=None,
)

# Settings a resumed run may change. Bit-exact resumes still need the same thread count and compile flag.
_RESUMABLE = {'resume', 'quiet', 'num_threads', 'device', 'debug_dump', 'eval_batch_size', 'output',
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
    if cfg['amp'] not in ('none', 'bf16'):
        raise ConfigError(f"--amp must be none or bf16, got {cfg['amp']!r}")
    return cfg


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


def compile_branches(model: torch.nn.Module) -> int:
    """torch.compile each residual branch; returns how many.

    The gates are Python bools drawn outside the compiled code, so skipping blocks never triggers a
    recompile (one graph per distinct block shape and mode). Compiling the whole model instead breaks
    the graph at every gate draw (measured on sd_resnet20: 17 graphs, about 2.4x slower than eager on CPU).
    """
    from .stochastic_depth import ResidualGateMixin
    blocks = [m for m in model.modules() if isinstance(m, ResidualGateMixin)]
    for block in blocks:
        block.forward_branch = torch.compile(block.forward_branch)
    return len(blocks)


def create_model(cfg: Dict, num_classes: int) -> torch.nn.Module:
    import timm
    kwargs = {k: cfg[k] for k in ('sd_schedule', 'sd_gate', 'sd_rule') if cfg[k] is not None}
    model = timm.create_model(cfg['model'], num_classes=num_classes, drop_path_rate=cfg['drop_path_rate'], **kwargs)
    if not hasattr(model, 'set_gate_generator'):
        raise ConfigError(f"{cfg['model']} is not a stochastic-depth model; use one of the sd_* models")
    return model


def _atomic_save(path: Path, save) -> None:
    """``save(tmp_path)`` then rename: a crash leaves the previous file or the new one, never half of one."""
    tmp = path.with_name(f'.{path.name}.tmp')
    save(tmp)
    os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
    _atomic_save(path, lambda p: p.write_text(json.dumps(obj, indent=2) + '\n'))


def _distributed() -> tuple:
    """(rank, world_size, local_rank) from torchrun's environment variables."""
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    return int(os.environ.get('RANK', 0)), world_size, int(os.environ.get('LOCAL_RANK', 0))


def _pct(v: Optional[float]) -> str:
    return '-' if v is None else f'{v:.2f}%'


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def train(config: Dict, command: Optional[str] = None) -> Dict:
    """Train as ``config`` says (keys: see DEFAULTS and RECIPES) and return the summary dict."""
    cfg = resolve_config(config)
    rank, world_size, local_rank = _distributed()
    device = torch.device(cfg['device'] or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if device.type == 'cuda' and world_size > 1:
        device = torch.device('cuda', local_rank)
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # fixed shapes: autotuned convolutions pay off at once
    if cfg['num_threads']:
        torch.set_num_threads(cfg['num_threads'])
    if cfg['batch_size'] % world_size:
        raise ConfigError(f"--batch-size {cfg['batch_size']} is the global batch; it must divide by {world_size} ranks")
    main = rank == 0
    out = Path(cfg['output'])
    weights_meta = dict(data=cfg['data'], recipe=cfg['recipe'])  # stored beside the weights
    ckpt_path = out / 'checkpoint.pt'
    if not cfg['resume'] and (ckpt_path.exists() or (out / 'final.safetensors').exists()):
        raise ConfigError(f'{out} already holds a run; pass --resume to continue it, or choose another --output')
    if main:
        out.mkdir(parents=True, exist_ok=True)
    use_amp = cfg['amp'] == 'bf16' and device.type == 'cuda'
    channels_last = cfg['channels_last'] and device.type == 'cuda'

    # Data: the paper's 45k/5k split of the training set, optionally a class-balanced subset.
    info = data.dataset_info(cfg['data'])
    if 'test' not in info.splits:
        raise ConfigError(f"{cfg['data']} has no test split; train on one of "
                          f"{', '.join(n for n, i in data.DATASETS.items() if 'test' in i.splits)}")
    x_train, y_train = data.load_split(cfg['data'], 'train')
    x_test, y_test = load_eval_split(cfg['data'], 'test', cfg['test_subset'])
    train_idx, val_idx = data.train_val_split(len(y_train), cfg['val_size'])
    if cfg['train_subset']:
        train_idx = data.balanced_subset(y_train, train_idx, cfg['train_subset'])
    loader = data.Loader(x_train[train_idx], y_train[train_idx], cfg['batch_size'], info.mean, info.std,
                         train=True, seed=cfg['seed'], device=device, rank=rank, world_size=world_size,
                         channels_last=channels_last)
    if len(loader) == 0:
        raise ConfigError(f"{len(train_idx)} training images make no full batch of {cfg['batch_size']}")
    eval_sets = {'val': (x_train[val_idx], y_train[val_idx]), 'test': (x_test, y_test)}
    eval_sets = {k: (torch.as_tensor(x).to(device), torch.as_tensor(y).to(device))
                 for k, (x, y) in eval_sets.items() if len(y)}

    # Model: identical initial weights and gate generator on every rank.
    torch.manual_seed(cfg['seed'])
    model = create_model(cfg, info.num_classes)
    gate_generator = torch.Generator().manual_seed(cfg['seed'])
    model.set_gate_generator(gate_generator)
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    optimizer = build_optimizer(model, cfg)
    steps_per_epoch = len(loader)
    total_steps = cfg['epochs'] * steps_per_epoch

    start_epoch, step, best, elapsed, commands = 0, 0, None, 0.0, []
    if cfg['resume'] and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location='cpu', weights_only=True)
        keys = (set(cfg) | set(ckpt['config'])) - _RESUMABLE
        changed = sorted(k for k in keys if ckpt['config'].get(k) != cfg.get(k))
        if changed:
            raise ConfigError(f'{out} was trained with other settings ({", ".join(changed)}); '
                              f'resume with the original ones or start a new --output')
        model.load_state_dict(ckpt['model'])
        optimizer.load_state_dict(ckpt['optimizer'])
        start_epoch, step, best, elapsed = ckpt['epoch'], ckpt['step'], ckpt['best'], ckpt['elapsed']
        torch.set_rng_state(ckpt['rng']['torch'])
        gate_generator.set_state(ckpt['rng']['gate'])
        if device.type == 'cuda' and 'cuda' in ckpt['rng']:
            torch.cuda.set_rng_state_all(ckpt['rng']['cuda'])
        commands = list(ckpt['commands'])
    # Only the epochs in the checkpoint: a crash may have logged one more.
    history = [row for row in read_metrics(out) if row['epoch'] <= start_epoch] if start_epoch else []
    if main:
        commands.append(command or f'train({cfg!r})')
        _write_json(out / 'run.json', dict(commands=commands, config=cfg, world_size=world_size,
                                           device=str(device), torch=torch.__version__))
        _atomic_save(out / 'metrics.jsonl', lambda p: p.write_text(''.join(json.dumps(r) + '\n' for r in history)))
    if cfg['compile']:
        compile_branches(model)
    ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None) \
        if world_size > 1 else model

    show_progress = main and not cfg['quiet'] and sys.stderr.isatty()
    say = print if main and not cfg['quiet'] else (lambda *a: None)
    say(f"sd-zoo train: {cfg['model']} on {info.title}, recipe {cfg['recipe']}, {len(train_idx)} training "
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
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = ddp_model(x)
                loss = F.cross_entropy(logits, y, label_smoothing=cfg['label_smoothing'])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # Accumulated on the device: no host sync inside the loop.
            loss_sum += loss.detach() * len(y)
            wrong += (logits.detach().argmax(1) != y).sum()
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
        errs = {}
        if (epoch + 1) % cfg['eval_every'] == 0 or last:
            fn = model_logits_fn(model, info.mean, info.std, channels_last, use_amp)
            errs = {k: evaluate(fn, x, y, cfg['eval_batch_size'], rank, world_size)['top1_err']
                    for k, (x, y) in eval_sets.items()}
        elapsed += time.perf_counter() - t0
        stats = model.block_stats()
        row = dict(
            epoch=epoch + 1, step=step, train_loss=totals[0].item() / totals[2].item(),
            train_err=100 * totals[1].item() / totals[2].item(), val_err=errs.get('val'), test_err=errs.get('test'),
            lr=lr, epoch_time_s=epoch_time, images_per_s=totals[2].item() / epoch_time,
            blocks_executed_measured=stats['executed'] / steps, blocks_expected=model.expected_depth)
        history.append(row)
        improved = row['val_err'] is not None and (best is None or row['val_err'] < best['val_err'])
        if improved:
            best = dict(epoch=epoch + 1, val_err=row['val_err'], test_err=row['test_err'])
        if main:
            with open(out / 'metrics.jsonl', 'a') as f:
                f.write(json.dumps(row) + '\n')
            if improved:
                save_weights(model, out / 'best.safetensors', cfg['model'], **weights_meta)
            if steps == steps_per_epoch:  # a cut-short epoch (--max-steps) cannot be resumed from
                state = dict(
                    model=model.state_dict(), optimizer=optimizer.state_dict(), epoch=epoch + 1, step=step,
                    best=best, elapsed=elapsed, config=cfg, commands=commands,
                    rng=dict(torch=torch.get_rng_state(), gate=gate_generator.get_state(),
                             **(dict(cuda=torch.cuda.get_rng_state_all()) if device.type == 'cuda' else {})))
                _atomic_save(ckpt_path, partial(torch.save, state))
            say(f"epoch {epoch + 1}/{cfg['epochs']}  loss {row['train_loss']:.4f}  train {_pct(row['train_err'])}  "
                f"val {_pct(row['val_err'])}  test {_pct(row['test_err'])}  lr {lr:.4g}  "
                f"{row['images_per_s']:.0f} img/s  blocks {row['blocks_executed_measured']:.2f}"
                f"/{row['blocks_expected']:.2f} expected")
        if stop:
            break

    final = history[-1] if history else {}
    summary = dict(
        model=cfg['model'], data=cfg['data'], data_title=info.title, recipe=cfg['recipe'],
        best_val_epoch=best and best['epoch'], best_val_err=best and best['val_err'],
        test_err_at_best_val=best and best['test_err'], final_epoch=final.get('epoch'),
        final_val_err=final.get('val_err'), final_test_err=final.get('test_err'), steps=step,
        total_time_s=elapsed, expected_depth=model.expected_depth, sd_config=model.sd_config(), config=cfg)
    if main:
        save_weights(model, out / 'final.safetensors', cfg['model'], **weights_meta)
        _write_json(out / 'summary.json', summary)
        plot_runs([out], out / 'curves.png')
        if summary['test_err_at_best_val'] is not None:
            say(f"test error at best validation epoch {best['epoch']}: {best['test_err']:.2f}% "
                f"(final {summary['final_test_err']:.2f}%) on {info.title}")
    if cfg['debug_dump']:
        dump_dir = Path(cfg['debug_dump'])
        dump_dir.mkdir(parents=True, exist_ok=True)
        _write_json(dump_dir / f'rank{rank}.json', dict(
            rank=rank, world_size=world_size, gates=gates_log,
            params={k: _digest(v) for k, v in model.state_dict().items()}))
    if world_size > 1:
        dist.destroy_process_group()
    return summary


def run(args: argparse.Namespace) -> int:
    config = {k: v for k, v in vars(args).items() if k not in ('func', 'command')}
    train(config, command=shlex.join(['sd-zoo'] + sys.argv[1:]))
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        'train', help='train a stochastic-depth ResNet on CIFAR', description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default=DEFAULTS['model'], help='timm model name (default: %(default)s)')
    p.add_argument('--data', required=True, choices=[n for n, i in data.DATASETS.items() if 'test' in i.splits])
    p.add_argument('--recipe', default=DEFAULTS['recipe'], choices=list(RECIPES))
    p.add_argument('--output', required=True, metavar='DIR')
    p.add_argument('--resume', action='store_true', help='continue the run in DIR from its last checkpoint')
    g = p.add_argument_group('recipe settings (default: the recipe\'s value)')
    g.add_argument('--epochs', type=int)
    g.add_argument('--batch-size', type=int, help='global batch size (all ranks together)')
    g.add_argument('--lr', type=float, help='peak learning rate')
    g.add_argument('--momentum', type=float)
    g.add_argument('--nesterov', action=argparse.BooleanOptionalAction)
    g.add_argument('--weight-decay', type=float)
    g.add_argument('--decay-norm-and-bias', action=argparse.BooleanOptionalAction,
                   help='apply weight decay to BatchNorm parameters and biases too (paper: yes)')
    g.add_argument('--label-smoothing', type=float)
    g.add_argument('--warmup-epochs', type=float, help='linear warm-up from 0 (may be fractional)')
    g.add_argument('--schedule', choices=('step', 'cosine', 'linear'), help='lr decay after warm-up')
    g.add_argument('--milestones', type=float, nargs='*', help='step schedule: fractions of training, e.g. 0.5 0.75')
    g.add_argument('--gamma', type=float, help='step schedule: lr factor at each milestone')
    g.add_argument('--amp', choices=('none', 'bf16'), help='bf16 autocast (CUDA only)')
    g.add_argument('--channels-last', action=argparse.BooleanOptionalAction, help='channels_last layout (CUDA only)')
    g = p.add_argument_group('model and run settings')
    g.add_argument('--drop-path-rate', type=float, default=DEFAULTS['drop_path_rate'],
                   help='1 - p_L: 0.5 as in the paper, 0 for constant depth (default: %(default)s)')
    g.add_argument('--sd-schedule', choices=('linear', 'uniform'), help='survival schedule (model default: linear)')
    g.add_argument('--sd-gate', choices=('batch', 'sample'), help='gate granularity (model default: batch)')
    g.add_argument('--sd-rule', choices=('paper', 'inverted'), help='scaling rule (model default: paper)')
    g.add_argument('--seed', type=int, default=DEFAULTS['seed'])
    g.add_argument('--val-size', type=int, default=DEFAULTS['val_size'],
                   help='validation images held out of the training set (default: %(default)s; 0 for none)')
    g.add_argument('--train-subset', type=int, metavar='N', help='train on the first N training images, class-balanced')
    g.add_argument('--test-subset', type=int, metavar='N', help='test on the first N test images, class-balanced')
    g.add_argument('--max-steps', type=int, metavar='N', help='stop after N optimizer steps (smoke tests)')
    g.add_argument('--eval-every', type=int, default=DEFAULTS['eval_every'], metavar='N',
                   help='validate and test every N epochs (and after the last)')
    g.add_argument('--eval-batch-size', type=int, default=DEFAULTS['eval_batch_size'])
    g.add_argument('--compile', action='store_true', help='torch.compile each residual branch')
    g.add_argument('--num-threads', type=int, help='torch CPU threads (fix it for bit-exact resumes)')
    g.add_argument('--device', help='cuda or cpu (default: cuda if available)')
    g.add_argument('--quiet', action='store_true', help='no progress bar or per-epoch lines')
    g.add_argument('--debug-dump', metavar='DIR',
                   help='testing aid: each rank writes DIR/rank<R>.json with its per-step gates and parameter digests')
    p.set_defaults(func=run)
