"""Does ``sd-zoo train --time-budget SECONDS`` end within its budget, and what does its probe cost?

For each budget, the command runs as a user runs it (a fresh process, wall clock from launch to exit),
then the same training again with ``--epochs N`` (and the warm-up the budget gave it) for the N the
budget chose, as the baseline without a probe::

    python benchmarks/bench_time_budget.py [--budgets 30 90] [--train-subset 1024] [--model sd_resnet20]

Prints per budget: the epochs chosen, the probe's seconds, the planned and measured wall time, wall /
budget (at most 1 is within budget), and the baseline's wall time with the budgeted run's ratio to it (on a
shared machine the two runs may see different load; the probe's own seconds are the direct cost).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(args, extra, output: Path) -> float:
    """Wall seconds of one ``sd-zoo train`` process, launch to exit."""
    cmd = [sys.executable, '-m', 'sd_zoo.cli', 'train', '--model', args.model, '--data', args.data, '--recipe', 'fast',
           '--train-subset', str(args.train_subset), '--val-size', '500', '--test-subset', '500', '--batch-size', '64',
           '--lr', '0.05', '--num-threads', str(args.num_threads), '--quiet', '--output', str(output), *extra]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get('PYTHONPATH')])))
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--budgets', type=float, nargs='+', default=[30.0, 90.0])
    p.add_argument('--model', default='sd_resnet20')
    p.add_argument('--data', default='cifar10-jpeg75')
    p.add_argument('--train-subset', type=int, default=1024)
    p.add_argument('--num-threads', type=int, default=1)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix='bench_time_budget_'))
    load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
    print(f'{args.model} on {args.data}, {args.train_subset} training images, batch 64, {args.num_threads} thread(s), '
          f'load average {load:.2f}')
    print(f"{'budget s':>8} {'epochs':>6} {'probe s':>7} {'planned s':>9} {'wall s':>7} {'wall/budget':>11} "
          f"{'stopped':>7} {'--epochs N wall s':>17} {'budget/baseline':>15}")
    for budget in args.budgets:
        wall = run(args, ['--time-budget', str(budget)], tmp / f'budget{budget:g}')
        summary = json.loads((tmp / f'budget{budget:g}' / 'summary.json').read_text())
        plan, cfg = summary['time_budget'], summary['config']
        baseline = run(args, ['--epochs', str(plan['epochs_run']), '--warmup-epochs', str(cfg['warmup_epochs'])],
                       tmp / f'epochs{budget:g}')
        print(f"{budget:8.0f} {plan['epochs_run']:6d} {plan['probe_s']:7.1f} {plan['planned_s']:9.1f} {wall:7.1f} "
              f"{wall / budget:11.3f} {str(plan['stopped_early']):>7} {baseline:17.1f} {wall / baseline:15.3f}",
              flush=True)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    main()
