"""`sd-zoo plot`: its flags, and the training curves of the runs they name, as in the paper's Figure 3."""
import argparse

from ..errors import ConfigError
from ..evaluation import metrics_plot
from ..evaluation.metrics_plot import plot_runs, read_metrics


def run(args: argparse.Namespace) -> int:
    for run_dir in args.runs:
        if not read_metrics(run_dir):
            raise ConfigError(f'{run_dir} holds no finished epoch (no metrics.jsonl rows); give the --output '
                              f'folder of an sd-zoo train run')
    if args.labels and len(args.labels) != len(args.runs):
        raise ConfigError(f'--labels gives {len(args.labels)} labels for {len(args.runs)} runs; give one per run')
    try:
        path = plot_runs(args.runs, args.output, labels=args.labels, title=args.title)
    except OSError as e:
        raise ConfigError(f'cannot write {args.output}: {e.strerror or e}; choose another -o/--output') from None
    print(f'wrote {path}')
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser('plot', help='test error and training loss vs epoch of training runs (paper Fig. 3)',
                              description=metrics_plot.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('runs', nargs='+', metavar='RUN_DIR', help='output directories of sd-zoo train')
    p.add_argument('-o', '--output', default='curves.png')
    p.add_argument('--labels', nargs='+', help='one legend label per run (default: from run.json)')
    p.add_argument('--title', help='plot title (default: the dataset)')
    p.set_defaults(func=run)
