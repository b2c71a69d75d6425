"""Plot of a stochastic-depth survival schedule: p_l for every residual block, expected depth in the title.

    sd-zoo schedule --model sd_resnet110 -o schedule.png                  # paper: p_L = 0.5, linear
    sd-zoo schedule --model sd_resnet110 --drop-path-rate 0.2 --sd-schedule uniform -o uniform.png

The Hub model cards embed this plot (``sd-zoo hub build``).
"""
from pathlib import Path
from typing import Optional, Sequence, Union

from ..models.stochastic_depth import expected_depth


def plot_schedule(source: Union[Sequence[float], object], path: Union[str, Path], title: Optional[str] = None) -> Path:
    """Write a PNG bar chart of the survival probability of every block of ``source``, an sd-zoo model or a
    sequence of probabilities (block 1 first); ``title`` goes above the line giving the expected depth."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, safe in threads and on servers

    if hasattr(source, 'survival_probs'):  # an sd-zoo model: its stage boundaries are drawn too
        probs = list(source.survival_probs)
        stages = [len(getattr(source, f'layer{i + 1}')) for i in range(getattr(source, 'num_stages', 0))]
    else:
        probs, stages = [float(p) for p in source], []
    n = len(probs)
    fig = Figure(figsize=(7, 3.2), dpi=120)
    ax = fig.subplots()
    ax.bar(range(1, n + 1), probs, width=1.0 if n > 60 else 0.8, color='tab:blue')
    edge = 0.5
    for size in stages[:-1]:  # stage boundaries: where the resolution halves
        edge += size
        ax.axvline(edge, color='grey', linestyle=':', linewidth=1)
    ax.set_xlim(0.5, n + 0.5)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel('residual block l')
    ax.set_ylabel('survival probability $p_l$')
    depth = f'expected depth {expected_depth(probs):.2f} of {n} blocks (p_L = {probs[-1]:.2f})'
    ax.set_title(f'{title}\n{depth}' if title else depth, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
