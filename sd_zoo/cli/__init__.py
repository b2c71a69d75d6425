"""The ``sd-zoo`` command: one subcommand per workflow (train, progress, eval, export, validate, hub, demo, plot, timm, ...).

Each subcommand has its module here, which owns its arguments through ``add_parser(subparsers)``: it
registers a subparser and sets ``func`` to the function that runs it; this file only wires them together.
The library modules they call know nothing of the command line.
"""
import argparse
import sys

from ..errors import SDZooError
from . import demo, export, hub, plot, progress, prune_curve, schedule, timm_scripts, train, validate
from . import eval as eval_command  # not the builtin

# The subcommands' modules, in the order they appear in ``sd-zoo --help``.
_COMMANDS = (train, progress, eval_command, export, validate, prune_curve, hub, demo, schedule, plot, timm_scripts)


class OneLineParser(argparse.ArgumentParser):
    """argparse's parser, except that a mistake on the command line (an unknown choice, a missing or
    malformed argument) ends in one line naming it, not in the usage block argparse prints first. The
    subcommands' parsers, nested ones included, are of this class."""

    def error(self, message: str):
        self.exit(2, f'{self.prog}: error: {message} (see {self.prog} --help)\n')


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog='sd-zoo', description='Stochastic-depth ResNets as timm models: train, evaluate, export to ONNX, publish.')
    parser.add_argument('--debug', action='store_true', help='show the full traceback of an error')
    subparsers = parser.add_subparsers(dest='command', metavar='COMMAND', parser_class=OneLineParser)
    for command in _COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    # Filled as parsing goes, so that a number out of range (sd_zoo.cli.args), found while parsing, knows its command.
    args = argparse.Namespace()
    try:
        try:
            parser.parse_args(argv, args)
        except SystemExit as e:  # --help, or a mistake OneLineParser has reported
            return e.code
        if not getattr(args, 'func', None):
            parser.print_help()
            return 2
        result = args.func(args)
    except SDZooError as e:
        if args.debug:
            raise
        print(f'sd-zoo {args.command}: error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == '__main__':
    sys.exit(main())
