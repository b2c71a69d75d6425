"""Training curves in the layout of the paper's Figure 3, drawn from the metrics.jsonl of training runs.

Test error (solid, left axis) and training loss (dashed, right axis) against epoch, one colour per run,
so a constant-depth run and a stochastic-depth run share one plot. A run tested only at the end
(``--test-at-end``, the paper's protocol) draws its validation error instead, its test errors as points::

    sd-zoo plot runs/sd runs/const -o fig3.png
"""
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .. import data
from ..models.stochastic_depth import describe_depth

SPLIT_NAMES = {'test': 'test', 'val': 'validation'}  # in legends
COLORS = ('tab:red', 'tab:blue', 'tab:green', 'tab:orange', 'tab:purple', 'tab:brown')


def read_metrics(run_dir) -> List[Dict]:
    """The per-epoch rows of a run's metrics.jsonl ([] before the first epoch)."""
    path = Path(run_dir) / 'metrics.jsonl'
    rows = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    return rows


def _run_record(run_dir) -> Dict:
    path = Path(run_dir) / 'run.json'
    return json.loads(path.read_text()) if path.exists() else {}


def run_label(run_dir) -> str:
    """'sd_resnet110 constant depth', 'sd_resnet110 stochastic depth (p_L = 0.5)', or the folder's name."""
    record = _run_record(run_dir)
    cfg = record.get('config', {})
    # Runs recorded before model_args was stored keep the rate in their config.
    model_args = record.get('model_args') or ({'drop_path_rate': cfg['drop_path_rate']}
                                              if cfg.get('drop_path_rate') is not None else None)
    if model_args is None:
        return Path(run_dir).name
    return f"{cfg.get('model', '')} {describe_depth(model_args)}".strip()


def error_curve(rows: Sequence[Dict]) -> Tuple[str, List[int], List[float]]:
    """``(split, epochs, errors)`` to draw for one run: its test error where it was tested in at least two
    epochs, else its validation error (a run tested only at the end has a single test point)."""
    for split in ('test', 'val'):
        measured = [r for r in rows if r.get(f'{split}_err') is not None]
        if len(measured) >= 2 or split == 'val':
            return split, [r['epoch'] for r in measured], [r[f'{split}_err'] for r in measured]


def plot_runs(run_dirs: Sequence, output, labels: Optional[Sequence[str]] = None,
              title: Optional[str] = None) -> Path:
    """Draw the runs' curves into ``output`` (PNG, PDF, SVG: by suffix) and return its path."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, safe in threads and on servers

    fig = Figure(figsize=(7, 4.5))
    ax_err = fig.add_subplot()
    ax_loss = ax_err.twinx()
    splits = set()
    for i, run_dir in enumerate(run_dirs):
        rows = read_metrics(run_dir)
        label = labels[i] if labels else run_label(run_dir)
        color = COLORS[i % len(COLORS)]
        split, epochs, errors = error_curve(rows)
        splits.add(split)
        ax_err.plot(epochs, errors, color=color, label=f'{label}: {SPLIT_NAMES[split]} error')
        tested = [r for r in rows if r.get('test_err') is not None]
        if split == 'val' and tested:
            ax_err.plot([r['epoch'] for r in tested], [r['test_err'] for r in tested], color=color, marker='o',
                        linestyle='none', label=f'{label}: test error')
        ax_loss.plot([r['epoch'] for r in rows], [r['train_loss'] for r in rows], color=color, linestyle='--',
                     label=f'{label}: training loss')
    ax_err.set_xlabel('epoch')
    ax_err.set_ylabel('test error (%)' if splits == {'test'} else 'error (%)')
    ax_loss.set_ylabel('training loss')
    ax_err.legend(handles=ax_err.get_lines() + ax_loss.get_lines(), loc='upper right', fontsize='small')
    if title is None:
        name = _run_record(run_dirs[0]).get('config', {}).get('data') if run_dirs else None
        title = data.DATASETS[name].title if name in data.DATASETS else ''
    ax_err.set_title(title)
    fig.savefig(output, dpi=150, bbox_inches='tight')
    return Path(output)
