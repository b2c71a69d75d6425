"""Allowed ranges of numeric settings: one rule and one message for every command's flags and for ``train(config)``.

A flag added with :func:`add_number` is checked while the command line is parsed, so a bad number ends in
one line naming the flag, the value and what is allowed (``--batch-size must be >= 1, got 0``) before any
work starts; Python APIs check the same :class:`Bound` with :func:`check_range`.
"""
import argparse
import math
from dataclasses import dataclass
from numbers import Real
from typing import Any, Callable, Mapping

from ..errors import ConfigError


@dataclass(frozen=True)
class Bound:
    """The numbers allowed for a setting: from ``low`` to ``high``, each end excluded where it is ``open``."""
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def allows(self, value: Real) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        ends = [f'{">" if self.low_open else ">="} {self.low}' if self.low > -math.inf else '',
                f'{"<" if self.high_open else "<="} {self.high}' if self.high < math.inf else '']
        return ' and '.join(e for e in ends if e) or 'a number'


COUNT = Bound(1)                       # sizes, steps, samples, threads, repeats
NON_NEGATIVE = Bound(0)                # where 0 means none (or all), and seeds
POSITIVE = Bound(0, low_open=True)     # rates and durations
FRACTION = Bound(0, 1, high_open=True)  # momentum, label smoothing
PROBABILITY = Bound(0, 1)              # drop-path rates, survival probabilities, lr milestones


def flag(key: str) -> str:
    """The command-line flag of a setting: ``batch_size`` -> ``--batch-size``."""
    return '--' + key.replace('_', '-')


def check_range(name: str, value: Any, bound: Bound) -> None:
    """ConfigError ``'<name> must be <bound>, got <value>'`` unless ``value`` (each one of a list) is a number
    in ``bound``; None (not given) passes."""
    if value is None:
        return
    for v in value if isinstance(value, (list, tuple)) else (value,):
        number = isinstance(v, Real) and not isinstance(v, bool)
        if number and not math.isfinite(v):  # nan passes every comparison, and no setting means infinity
            raise ConfigError(f'{name} must be a finite number, got {v}')
        if not (number and bound.allows(v)):
            raise ConfigError(f'{name} must be {bound}, got {v if number else repr(v)}')


def check_ranges(values: Mapping[str, Any], bounds: Mapping[str, Bound]) -> None:
    """:func:`check_range` of every setting named in ``bounds``, named by its flag."""
    for key, bound in bounds.items():
        check_range(flag(key), values.get(key), bound)


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
