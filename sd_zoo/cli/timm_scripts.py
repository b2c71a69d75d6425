"""`sd-zoo timm SCRIPT [ARGS...]`: run one of timm's own scripts with the sd-zoo models registered.

timm's ``train.py`` takes ``--device-modules sd_zoo``, but ``validate.py`` and ``inference.py`` have no flag
that imports a model plugin. This command imports ``sd_zoo`` (which registers its models and tags with
timm), then runs the script unchanged as ``__main__`` with the arguments that follow it::

    sd-zoo timm validate.py --model sd_resnet20.c10j75 --pretrained --data-dir cifar10-jpeg75/test --device cpu

The scripts live in timm's repository (github.com/huggingface/pytorch-image-models), not in its package.
"""
import argparse
import runpy
import sys
from pathlib import Path

from ..errors import ConfigError

# Packages timm's scripts import beyond timm's own requirements: the ``timm-scripts`` extra of pyproject.toml.
SCRIPT_PACKAGES = ('pandas',)


def run(args: argparse.Namespace) -> int:
    script = Path(args.script)
    if not script.is_file():
        raise ConfigError(f'{script}: no such file; give the path of timm\'s train.py, validate.py or inference.py '
                          f'(they are in a checkout of timm\'s repository, not in the pip package)')
    saved = sys.argv
    sys.argv = [str(script)] + list(args.script_args)
    try:
        runpy.run_path(str(script), run_name='__main__')
    except SystemExit as e:  # the script's own exit status is ours
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except ModuleNotFoundError as e:
        if not e.name:
            raise
        # timm's scripts import packages timm itself does not need (inference.py: pandas).
        package = e.name.split('.')[0]
        extra = ' (or pip install "sd-zoo[timm-scripts]")' if package in SCRIPT_PACKAGES else ''
        raise ConfigError(f'{script.name} needs the Python package {package!r}, which is not installed: '
                          f'pip install {package}{extra}') from None
    finally:
        sys.argv = saved
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser('timm', help="run timm's train.py / validate.py / inference.py with sd-zoo's models",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('script', metavar='SCRIPT', help="path of a timm script, e.g. validate.py")
    p.add_argument('script_args', nargs=argparse.REMAINDER, metavar='ARGS', help='its arguments, unchanged')
    p.set_defaults(func=run)
