"""`sd-zoo schedule`: its flags, and the plot of the survival schedule of the model they build."""
import argparse

from ..evaluation import schedule_plot
from ..evaluation.schedule_plot import plot_schedule
from ..models.stochastic_depth import SCHEDULES
from ..ranges import PROBABILITY
from ..weights.loader import load_model
from .args import add_number, model_args_of


def run(args: argparse.Namespace) -> int:
    model = load_model(args.model, pretrained=False, **model_args_of(args))
    path = plot_schedule(model, args.output, title=args.model)
    print(f'{path}: {model.num_blocks} blocks, expected depth {model.expected_depth:.2f}')
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        'schedule', help='plot the survival probability of every block of a model', description=schedule_plot.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', required=True, help='timm name, e.g. sd_resnet110 or sd_resnet110.c10j75_cd')
    p.add_argument('-o', '--output', required=True, metavar='PNG')
    add_number(p, '--drop-path-rate', bound=PROBABILITY, type=float, help='1 - p_L (default: the model\'s, 0.5)')
    p.add_argument('--sd-schedule', choices=SCHEDULES, help='default: the model\'s (linear)')
    p.set_defaults(func=run)
