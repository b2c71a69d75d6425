"""The one range check of numeric settings (sd_zoo.ranges): its bounds at their edges, every numeric flag of
every command declared with one (sd_zoo.cli.args), and train(config) held to the same bounds as its flags."""
import argparse
import math
import re

import pytest

import sd_zoo  # noqa: F401  (registers the models)
from sd_zoo import cli
from sd_zoo.training import train
from sd_zoo.cli.args import InRange
from sd_zoo.errors import ConfigError
from sd_zoo.ranges import COUNT, FRACTION, NON_NEGATIVE, POSITIVE, PROBABILITY, check_range


@pytest.mark.parametrize('bound, allowed, refused, allows', [
    (COUNT, [1, 2, 10 ** 9], [0, -1, -5], '>= 1'),
    (NON_NEGATIVE, [0, 1], [-1, -0.001], '>= 0'),
    (POSITIVE, [1e-12, 0.1, 5], [0, 0.0, -0.1], '> 0'),
    (FRACTION, [0, 0.5, 0.999], [1, 1.0, -0.01], '>= 0 and < 1'),
    (PROBABILITY, [0, 0.5, 1, 1.0], [1.0001, -0.0001], '>= 0 and <= 1'),
])
def test_bounds_at_their_edges(bound, allowed, refused, allows):
    for value in allowed:
        check_range('--x', value, bound)
    for value in refused:
        with pytest.raises(ConfigError, match=f'^--x must be {allows}, got {value}$'):
            check_range('--x', value, bound)


def test_what_no_bound_allows():
    check_range('--x', None, COUNT)  # not given
    for value in (math.nan, math.inf, -math.inf):
        with pytest.raises(ConfigError, match=f'--x must be a finite number, got {value}'):
            check_range('--x', value, POSITIVE)
    for value, shown in ((True, 'True'), ('5', "'5'")):
        with pytest.raises(ConfigError, match=f'--x must be >= 1, got {shown}'):
            check_range('--x', value, COUNT)
    check_range('--x', [0, 0.5, 1], PROBABILITY)
    check_range('--x', [], PROBABILITY)  # --milestones given no value
    with pytest.raises(ConfigError, match='got 1.5'):
        check_range('--x', (0.5, 1.5), PROBABILITY)  # every element


def _parsers(parser: argparse.ArgumentParser, prog: str = 'sd-zoo'):
    yield prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f'{prog} {name}')


def test_every_numeric_flag_of_every_command_has_a_bound():
    numeric, unbounded = [], []
    for prog, parser in _parsers(cli.build_parser()):
        for action in parser._actions:
            if action.type in (int, float) or isinstance(action, InRange):
                numeric.append(f'{prog} {action.option_strings[-1]}')
                if not isinstance(action, InRange):
                    unbounded.append(numeric[-1])
    assert len(numeric) >= 40 and {'sd-zoo demo --random', 'sd-zoo hub build --limit', 'sd-zoo export --batch',
                                   'sd-zoo train --sd-probs'} <= set(numeric)
    assert not unbounded, f'numeric flags without a bound (sd_zoo.cli.args.add_number): {unbounded}'


def test_a_number_out_of_range_stops_parsing_with_the_flag_the_user_typed():
    parser = cli.build_parser()
    with pytest.raises(ConfigError, match='^--random must be >= 1, got -3$'):
        parser.parse_args(['demo', '--random', '-3'])
    args = parser.parse_args(['demo', '--random', '3', '--limit', '0'])
    assert (args.random, args.limit) == (3, 0)
    args = parser.parse_args(['export', '--model', 'sd_resnet20', '-o', 'm.onnx', '--batch', 'dynamic'])
    assert args.batch == 'dynamic'  # the word its type allows is no number to check


@pytest.mark.parametrize('setting, value, message', [
    ('momentum', 1.0, '--momentum must be >= 0 and < 1, got 1.0'),
    ('label_smoothing', -0.1, '--label-smoothing must be >= 0 and < 1, got -0.1'),
    ('seed', -1, '--seed must be >= 0, got -1'),
    ('milestones', (0.5, 2.0), '--milestones must be >= 0 and <= 1, got 2.0'),
    ('epochs', '5', "--epochs must be >= 1, got '5'"),
    ('lr', math.nan, '--lr must be a finite number, got nan'),
])
def test_train_config_is_held_to_the_bounds_of_its_flags(setting, value, message):
    with pytest.raises(ConfigError, match=f'^{re.escape(message)}$'):
        train.resolve_config(dict(output='x', **{setting: value}))
    ok = train.resolve_config(dict(output='x', momentum=0.0, seed=0, milestones=[0, 1], label_smoothing=0.0))
    assert ok['milestones'] == (0.0, 1.0)
