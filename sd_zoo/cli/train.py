"""`sd-zoo train`: the flags of a run, each one a setting of ``train(config)`` (only those typed are given)."""
import argparse
import shlex
import sys
import time

from ..errors import ConfigError
from ..ranges import flag
from ..training import time_budget, train as train_module
from ..training.train import AMP_CHOICES, BOUNDS, DEFAULTS, RECIPES, RESUMABLE, train, trainable_datasets
from .args import add_model_arguments, add_number


def run(args: argparse.Namespace) -> int:
    # Only the flags typed are in ``args`` (argument_default=SUPPRESS): a resumed run takes the rest from its record.
    config = {k: v for k, v in vars(args).items() if k not in ('func', 'command', 'debug')}
    if not config.get('resume') and 'data' not in config:
        raise ConfigError(f'a new run needs --data, one of {", ".join(trainable_datasets())} '
                          f'(or --resume --output DIR to continue a run)')
    # The budget counts from the process start: Python's start-up and imports are part of it.
    started = time.perf_counter() - time_budget.process_age()
    train(config, command=shlex.join(['sd-zoo'] + sys.argv[1:]), started=started)
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        'train', help='train a stochastic-depth ResNet on CIFAR', description=train_module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS)
    p.add_argument('--model', help=f"timm model name (default: {DEFAULTS['model']})")
    p.add_argument('--data', choices=trainable_datasets(), help='required for a new run')
    p.add_argument('--recipe', choices=list(RECIPES), help=f"default: {DEFAULTS['recipe']}")
    p.add_argument('--output', metavar='DIR', help='required: the run folder')
    p.add_argument('--resume', action='store_true',
                   help='continue the run in DIR from its last checkpoint with its own settings; a flag given '
                        'with it must agree with them, except '
                        + ', '.join(sorted(map(flag, RESUMABLE - {'resume', 'output'}))))
    add_model_arguments(p)
    g = p.add_argument_group('recipe settings (default: the recipe\'s value)')
    add_number(g, '--epochs', bound=BOUNDS['epochs'])
    add_number(g, '--batch-size', bound=BOUNDS['batch_size'], help='global batch size (all ranks together)')
    add_number(g, '--lr', bound=BOUNDS['lr'], type=float, help='peak learning rate')
    add_number(g, '--momentum', bound=BOUNDS['momentum'], type=float)
    g.add_argument('--nesterov', action=argparse.BooleanOptionalAction)
    add_number(g, '--weight-decay', bound=BOUNDS['weight_decay'], type=float)
    g.add_argument('--decay-norm-and-bias', action=argparse.BooleanOptionalAction,
                   help='apply weight decay to BatchNorm parameters and biases too (paper: yes)')
    add_number(g, '--label-smoothing', bound=BOUNDS['label_smoothing'], type=float)
    add_number(g, '--warmup-epochs', bound=BOUNDS['warmup_epochs'], type=float,
               help='linear warm-up from 0 (may be fractional)')
    g.add_argument('--schedule', choices=('step', 'cosine', 'linear'), help='lr decay after warm-up')
    add_number(g, '--milestones', bound=BOUNDS['milestones'], type=float, nargs='*',
               help='step schedule: fractions of training, e.g. 0.5 0.75')
    add_number(g, '--gamma', bound=BOUNDS['gamma'], type=float, help='step schedule: lr factor at each milestone')
    g.add_argument('--amp', choices=AMP_CHOICES,
                   help='bf16 autocast (BatchNorm statistics and the loss stay fp32); auto: bf16 where the GPU or '
                        'CPU computes it natively (avx512_bf16, AMX), fp32 where it would be emulated')
    g.add_argument('--channels-last', action=argparse.BooleanOptionalAction, help='channels_last memory layout')
    g = p.add_argument_group('model and run settings')
    g.add_argument('--pretrained', action='store_true', help='start from the published weights of --model '
                   'NAME.TAG (fine-tuning; a new head if the class count differs)')
    g.add_argument('--init-weights', metavar='FILE', help='start from a safetensors file written by sd-zoo')
    add_number(g, '--seed', bound=BOUNDS['seed'])
    add_number(g, '--val-size', bound=BOUNDS['val_size'],
               help=f"validation images held out of the training set (default: {DEFAULTS['val_size']}; 0 for none)")
    add_number(g, '--train-subset', bound=BOUNDS['train_subset'], metavar='N',
               help='train on the first N training images, class-balanced')
    add_number(g, '--test-subset', bound=BOUNDS['test_subset'], metavar='N',
               help='test on the first N test images, class-balanced')
    add_number(g, '--max-steps', bound=BOUNDS['max_steps'], metavar='N',
               help='stop after N optimizer steps (smoke tests)')
    add_number(g, '--eval-every', bound=BOUNDS['eval_every'], metavar='N',
               help='validate and test every N epochs (and after the last)')
    add_number(g, '--eval-batch-size', bound=BOUNDS['eval_batch_size'])
    g.add_argument('--test-at-end', action='store_true',
                   help='score the test set only once, for the final and the best-validation weights (the paper\'s '
                        'protocol; saves a test pass per epoch); validation still runs every --eval-every epochs')
    add_number(g, '--time-budget', bound=BOUNDS['time_budget'], type=float, metavar='SECONDS',
               help='train the most epochs (at most --epochs) that fit in SECONDS of wall-clock time, set-up, '
                    'evaluation and checkpoints included; the lr schedule spans exactly those epochs')
    g.add_argument('--compile', action='store_true', help='torch.compile each residual branch')
    add_number(g, '--num-threads', bound=BOUNDS['num_threads'], help='torch CPU threads (fix it for bit-exact resumes)')
    g.add_argument('--device', help='cuda or cpu (default: cuda if available)')
    g.add_argument('--quiet', action='store_true', help='no progress bar or per-epoch lines')
    g.add_argument('--debug-dump', metavar='DIR',
                   help='testing aid: each rank writes DIR/rank<R>.json with its per-step gates and parameter digests')
    p.set_defaults(func=run)
