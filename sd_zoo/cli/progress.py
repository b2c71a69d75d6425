"""`sd-zoo progress`: how far training runs have come and how long they have left, one line (or JSON) each."""
import argparse
import json

from ..training import progress
from ..training.progress import describe, run_progress


def run(args: argparse.Namespace) -> int:
    reports = {str(run_dir): run_progress(run_dir) for run_dir in args.runs}
    for run_dir, report in reports.items():
        print(json.dumps(report, indent=2) if args.json else f'{run_dir}: {describe(report)}')
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser('progress', help='epochs done, best validation error and time left of training runs',
                              description=progress.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('runs', nargs='+', metavar='RUN_DIR', help='output folders of sd-zoo train')
    p.add_argument('--json', action='store_true', help='print each run\'s progress.json object instead of a line')
    p.set_defaults(func=run)
