"""`sd-zoo prune-curve`: its flags, and the table, plot and JSON of the curves they measure (or, with
``--replot``, the plot of curves measured before)."""
import argparse
import json
from pathlib import Path

import torch

from .. import data
from ..deploy import prune_curve
from ..deploy.onnx_runtime import import_onnxruntime
from ..deploy.prune_curve import REPEATS, format_table, measure_curves, plot_curves
from ..deploy.pruning import IMPORTANCE_IMAGES
from ..errors import ConfigError
from ..ranges import COUNT
from ..weights.loader import load_named
from .args import add_number, counts, parse_order


def plot_title(prune_order, data_name: str) -> str:
    order = prune_order if isinstance(prune_order, str) else 'explicit'
    return f'Depth pruning, {order} order; {data.dataset_info(data_name).title}, test split'


def read_curves(path: str) -> dict:
    """The object a ``--json`` run printed last, from a file holding it alone or the whole output."""
    try:
        lines = Path(path).read_text().strip().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f'cannot read --replot {path}: {getattr(e, "strerror", None) or e}') from None
    try:
        saved = json.loads(lines[-1])
        curves = saved['curves']
        rows = [r for curve in curves.values() for r in curve]
        if (not rows or not {'data', 'prune_order'} <= set(saved) or not isinstance(saved['data'], str)
                or not all({'blocks', 'top1_err', 'latency_ms_bs1', 'latency_ms_bs64'} <= set(r) for r in rows)):
            raise ValueError
    except (ValueError, IndexError, KeyError, TypeError, AttributeError):
        raise ConfigError(f'--replot {path} holds no prune-curve results; give the output of '
                          f'`sd-zoo prune-curve --json` (its last line is the JSON object)') from None
    return saved


def replot(args: argparse.Namespace) -> int:
    if args.model or args.data:
        raise ConfigError('--replot draws curves measured before and measures nothing; leave out --model and --data')
    if not args.plot:
        raise ConfigError('--replot needs --plot FILE, the PNG to write')
    saved = read_curves(args.replot)
    print(f'plot: {plot_curves(saved["curves"], args.plot, plot_title(saved["prune_order"], saved["data"]))}')
    return 0


def run(args: argparse.Namespace) -> int:
    if args.replot:
        return replot(args)
    if not args.model or not args.data:
        raise ConfigError('prune-curve needs --model TAG and --data NAME (or --replot FILE to redraw saved curves)')
    onnxruntime = import_onnxruntime()  # its install hint, before any model is loaded

    torch.set_num_threads(args.threads)
    if len(set(args.model)) != len(args.model):
        raise ConfigError(f'--model repeats a model: {args.model}; name each once')
    loaded = {name: load_named(name) for name in args.model}
    models = {name: model for name, (model, _) in loaded.items()}
    curves = measure_curves(models, args.data, args.prune_order, args.limit, args.threads,
                            importance_images=args.importance_images, blocks=args.blocks, progress=not args.quiet)
    title = data.dataset_info(args.data).title
    print(f'{title} test split, {args.limit or "all"} images; prune order {args.prune_order}; ONNX Runtime '
          f'{onnxruntime.__version__} CPU, {args.threads} thread(s), median of {REPEATS[1]} (batch 1) and '
          f'{REPEATS[64]} (batch 64) interleaved calls')
    print(format_table(curves))
    if args.plot:
        print(f'plot: {plot_curves(curves, args.plot, plot_title(args.prune_order, args.data))}')
    if args.json:
        print(json.dumps(dict(curves=curves, weights={name: named.fields() for name, (_, named) in loaded.items()},
                              data=args.data, split='test', images=args.limit,
                              prune_order=args.prune_order, threads=args.threads)))
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        'prune-curve', help='error, MACs and ONNX CPU latency of a model pruned to each depth',
        description=prune_curve.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', action='append', metavar='TAG',
                   help='pretrained tag, Hub folder or weights file; repeat to compare models')
    p.add_argument('--data', choices=list(data.DATASETS), help='the test split scored')
    p.add_argument('--prune-order', type=parse_order, default='survival', metavar='ORDER',
                   help='survival (default), importance, or block indices i,j,... dropped first')
    add_number(p, '--limit', bound=COUNT, metavar='N', help='score only N test images, class-balanced')
    add_number(p, '--blocks', bound=COUNT, type=counts, metavar='N,N,...',
               help='the block counts to measure (default: every one, from all blocks down to one per stage)')
    add_number(p, '--importance-images', bound=COUNT, default=IMPORTANCE_IMAGES, metavar='N',
               help='validation images that rank blocks for --prune-order importance (default %(default)s)')
    add_number(p, '--threads', bound=COUNT, default=1, help='CPU threads for PyTorch and ONNX Runtime (default 1)')
    p.add_argument('--plot', metavar='FILE', help='write the curves as a PNG')
    p.add_argument('--replot', metavar='FILE', help='draw the curves of an earlier --json output (with --plot; '
                                                    'measures nothing)')
    p.add_argument('--json', action='store_true', help='print {"curves": {TAG: [rows]}} as one JSON object last')
    p.add_argument('--quiet', action='store_true', help='no progress bars')
    p.set_defaults(func=run)
