"""Allowed ranges of numeric settings and their one check, for every command's flags and for the Python API."""
import math
from dataclasses import dataclass
from numbers import Real
from typing import Any, Mapping

from .errors import ConfigError


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
