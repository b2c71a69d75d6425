"""Flags shared by the commands: numbers checked against their range as they are parsed, the stochastic-depth
settings of a model and the prune order.

A flag added with :func:`add_number` is checked while the command line is parsed, so a bad number ends in
one line naming the flag, the value and what is allowed (``--batch-size must be >= 1, got 0``) before any
work starts; Python APIs check the same :class:`sd_zoo.ranges.Bound` with :func:`sd_zoo.ranges.check_range`.
"""
import argparse
from typing import Any, Callable, Dict, List

from ..deploy.pruning import ORDERS, Order
from ..models.stochastic_depth import GATES, RULES, SCHEDULES
from ..ranges import PROBABILITY, Bound, check_range
from ..weights.loader import MODEL_ARG_NAMES


class InRange(argparse.Action):
    """Stores a number (or a list of them) after :func:`check_range`. Its ConfigError passes through argparse,
    which catches only its own errors, so ``sd-zoo`` prints it as one line, not as a usage message."""

    def __init__(self, option_strings, dest, bound: Bound, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.bound = bound

    def __call__(self, parser, namespace, values, option_string=None):
        if not isinstance(values, str):  # a word its type allows (``--batch dynamic``) is no number to check
            check_range(option_string or self.metavar or self.dest, values, self.bound)
        setattr(namespace, self.dest, values)


def add_number(parser, *flags: str, bound: Bound, type: Callable = int, **kwargs) -> argparse.Action:
    """``parser.add_argument(*flags, type=type, **kwargs)`` for a number whose given value must lie in ``bound``."""
    return parser.add_argument(*flags, type=type, action=InRange, bound=bound, **kwargs)


def _probabilities(value: str) -> List[float]:
    try:
        return [float(p) for p in value.split(',')]
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected comma-separated probabilities p_1,...,p_L, got {value!r}') from None


def counts(value: str) -> List[int]:
    """Comma-separated whole numbers (``--blocks 54,40,27``)."""
    try:
        return [int(n) for n in value.split(',')]
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected comma-separated whole numbers N,N,..., got {value!r}') from None


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The stochastic-depth flags, named after the create_model arguments they set (default: the model's own)."""
    g = p.add_argument_group('stochastic depth (default: the model\'s own, or its tag\'s)')
    add_number(g, '--drop-path-rate', bound=PROBABILITY, type=float, metavar='R',
               help='1 - p_L: 0.5 in the paper, 0 = constant depth')
    g.add_argument('--sd-schedule', choices=SCHEDULES, help='decay of survival probabilities over blocks')
    add_number(g, '--sd-probs', bound=PROBABILITY, type=_probabilities, metavar='P1,...,PL',
               help='explicit survival probabilities')
    g.add_argument('--sd-gate', choices=GATES, help='one draw per block per mini-batch (paper) or per sample')
    g.add_argument('--sd-rule', choices=RULES, help='paper: eval scales branches by p_l; inverted: training divides')


def model_args_of(args: argparse.Namespace) -> Dict[str, Any]:
    """The create_model arguments given on the command line by :func:`add_model_arguments`'s flags."""
    return {k: getattr(args, k) for k in MODEL_ARG_NAMES if getattr(args, k, None) is not None}


def parse_order(value: str) -> Order:
    """Prune order (``--prune-order``): ``survival``, ``importance``, or comma-separated block indices."""
    if value in ORDERS:
        return value
    try:
        return [int(i) for i in value.split(',')]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f'expected {" or ".join(ORDERS)} or comma-separated block indices, got {value!r}') from None
