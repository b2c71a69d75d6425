"""How far a training run has come and how long it has left, read from its own files.

The trainer rewrites ``progress.json`` in its output folder after every epoch; ``sd-zoo progress DIR``
computes the same from ``metrics.jsonl`` and ``run.json`` for any run, running, interrupted or finished.
Epoch times on a shared machine vary several-fold with what else runs on it, so the time left is
estimated from the fastest quarter of the epochs so far (what an epoch takes with the machine to itself);
the median is given beside it. A run resumed on other hardware is estimated from the epochs of its latest
part (``run.json``'s ``parts``) once it has finished one.
"""
import json
import math
import statistics
from pathlib import Path
from typing import Dict, List

from ..errors import ConfigError
from ..evaluation.metrics_plot import read_metrics

ESTIMATE_NOTE = ('epoch times vary with what else shares the machine; the estimate uses the fastest quarter of '
                 'the epochs since quiet_since_epoch (the latest resume, which may run on other hardware)')


def quiet_epoch_time(times: List[float]) -> float:
    """Mean of the fastest quarter (at least one) of the epoch times."""
    fastest = sorted(times)[:max(1, math.ceil(len(times) / 4))]
    return sum(fastest) / len(fastest)


def estimate(rows: List[Dict], epochs: int, finished: bool, part_start: int = 1) -> Dict:
    """The progress of a run that plans ``epochs`` epochs and has finished ``rows`` (metrics.jsonl rows);
    its latest part started with epoch ``part_start``."""
    times = [r['epoch_time_s'] for r in rows]
    this_part = [r['epoch_time_s'] for r in rows if r['epoch'] >= part_start]
    # The first epoch whose time the estimate uses: the latest part's, or the run's while that part has none.
    since = part_start if this_part else (rows[0]['epoch'] if rows else 1)
    this_part = this_part or times
    measured = [r for r in rows if r.get('val_err') is not None]
    best = min(measured, key=lambda r: r['val_err'], default=None)
    quiet = quiet_epoch_time(this_part) if times else None
    done = rows[-1]['epoch'] if rows else 0
    return dict(
        epochs_done=done, epochs=epochs, finished=finished,
        best_val_err=best and best['val_err'], best_val_epoch=best and best['epoch'],
        median_epoch_time_s=statistics.median(times) if times else None, quiet_epoch_time_s=quiet,
        quiet_since_epoch=since,
        estimated_time_left_s=0 if finished else (round((epochs - done) * quiet) if quiet else None),
        note=ESTIMATE_NOTE)


def progress_record(run_dir, rows: List[Dict], epochs: int, finished: bool, part_start: int = 1) -> Dict:
    """:func:`estimate`, with the command that continues the run in ``run_dir`` while it is unfinished."""
    progress = estimate(rows, epochs, finished, part_start)
    if not finished:
        progress['resume'] = f'sd-zoo train --resume --output {run_dir}'
    return progress


def run_progress(run_dir) -> Dict:
    """:func:`progress_record` of the training run in ``run_dir``, read from its files."""
    run_dir = Path(run_dir)
    record_path = run_dir / 'run.json'
    if not record_path.is_file():
        raise ConfigError(f'{run_dir} has no run.json: give the --output folder of an sd-zoo train run')
    record = json.loads(record_path.read_text())
    part_start = record['parts'][-1]['first_epoch'] if record.get('parts') else 1
    return progress_record(run_dir, read_metrics(run_dir), record['config']['epochs'],
                           (run_dir / 'summary.json').is_file(), part_start)


def describe(progress: Dict) -> str:
    """One line: epochs, best validation error, epoch times (the median of all; the fastest quarter of those
    the estimate uses, named where that is only the latest part's), time left."""
    p = progress
    parts = [f"epoch {p['epochs_done']} of {p['epochs']}" + (' (finished)' if p['finished'] else '')]
    if p['best_val_err'] is not None:
        parts.append(f"best validation error {p['best_val_err']:.2f} % (epoch {p['best_val_epoch']})")
    if p['median_epoch_time_s'] is not None:
        since = p.get('quiet_since_epoch', 1)
        of = f', of the epochs since the resume at epoch {since}' if since > 1 else ''
        parts.append(f"{p['median_epoch_time_s']:.0f} s per epoch (median; fastest quarter "
                     f"{p['quiet_epoch_time_s']:.0f} s{of})")
    if not p['finished'] and p['estimated_time_left_s'] is not None:
        parts.append(f"about {p['estimated_time_left_s'] / 3600:.1f} h left")
    return ', '.join(parts)
