"""`sd-zoo prune-curve`: test error, multiply-accumulates and ONNX Runtime latency at every pruned depth.

For each model and each number of kept blocks N, from all blocks down to one block per stage (or the
counts ``--blocks`` names: a 54-block net has 52 depths, each a pass over the test split), the
model is pruned (:func:`sd_zoo.prune_blocks`; one ranking per model, so the nets are nested), scored
in PyTorch on the test split (so the all-blocks row is the model card's error), counted (MACs of one
image) and exported to ONNX; then every exported graph is timed on the CPU at batch 1 and batch 64 in
one interleaved loop (``onnx_runtime.time_interleaved``), so that a load change on the machine hits all
of them alike. :func:`measure_curves` returns the rows, :func:`pruning_table` the rows of one model
(for a model card), :func:`plot_curves` draws them.
"""
import tempfile
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from torch import nn

from ..evaluation.evaluate import (
    check_num_classes, count_params_macs, evaluate, load_eval_split, model_logits_fn
)
from ..errors import ConfigError
from ..models.tags import normalization
from ..models.block_slots import kept_blocks
from .pruning import IMPORTANCE_IMAGES, blocks_to_keep, drop_ranking, prune_blocks

REPEATS = {1: 300, 64: 40}


def depths(model: nn.Module) -> List[int]:
    """Block counts of the curve: all kept blocks down to one per stage."""
    return list(range(len(kept_blocks(model)), len(model._stages()) - 1, -1))


def _time_graphs(paths: Dict[Any, Path], threads: int, repeats: Dict[int, int]) -> Dict[Any, Dict[int, float]]:
    """Median ms per call of each ONNX file at each batch size, all files interleaved."""
    from .onnx_runtime import OnnxClassifier, time_interleaved

    sessions = {key: OnnxClassifier(path, threads=threads) for key, path in paths.items()}
    rng = np.random.default_rng(0)
    out: Dict[Any, Dict[int, float]] = {key: {} for key in paths}
    for batch, n in repeats.items():
        calls = {key: partial(s, rng.standard_normal((batch, *s.input_shape[1:]), dtype=np.float32))
                 for key, s in sessions.items()}
        for key, t in time_interleaved(calls, n).items():
            out[key][batch] = 1000.0 * float(np.median(t))
    return out


def measure_curves(models: Dict[str, nn.Module], data_name: str, order='survival', limit: Optional[int] = None,
                   threads: int = 1, repeats: Optional[Dict[int, int]] = None,
                   importance_images: int = IMPORTANCE_IMAGES, blocks: Optional[Sequence[int]] = None,
                   progress: bool = True) -> Dict[str, List[Dict[str, Any]]]:
    """``{name: [{'blocks', 'kept', 'top1_err', 'macs', 'latency_ms_bs1', 'latency_ms_bs64'}, ...]}``.

    ``models`` are eval-mode sd-zoo models by display name, scored on the test split of ``data_name``
    (``limit`` images, class-balanced, if given) at the block counts ``blocks`` (default :func:`depths`).
    ``threads``: ONNX Runtime CPU threads (1: the least noisy on a shared machine); ``repeats``: timed calls
    per batch size (default :data:`REPEATS`).
    """
    from tqdm.auto import tqdm
    from .onnx_export import export_onnx

    repeats = repeats or REPEATS
    for name, model in models.items():
        check_num_classes(name, model.num_classes, data_name)
        wrong = [n for n in blocks or () if n not in depths(model)]
        if wrong:  # before any scoring: a deep net's curve takes long
            raise ConfigError(f'blocks {wrong}: {name} keeps between {depths(model)[-1]} (one per stage) and '
                              f'{depths(model)[0]} blocks')
    images, labels = load_eval_split(data_name, 'test', limit)
    rows: Dict[str, List[Dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix='sd_zoo_prune_curve_') as tmp:
        paths = {}
        for name, model in models.items():
            ranking = drop_ranking(model, order, data_name, num_images=importance_images, progress=progress)
            rows[name] = []
            for n in tqdm(blocks or depths(model), desc=f'{name} depths', unit='net', disable=not progress):
                pruned = prune_blocks(model, blocks_to_keep(model, n, ranking)).eval()
                err = evaluate(model_logits_fn(pruned, *normalization(pruned)), images, labels)['top1_err']
                paths[name, n] = Path(tmp) / f'{len(paths)}.onnx'
                export_onnx(pruned, paths[name, n])
                rows[name].append(dict(blocks=n, kept=list(pruned.sd_keep_blocks), top1_err=round(err, 2),
                                       macs=int(count_params_macs(pruned)[1])))
        latency = _time_graphs(paths, threads, repeats)
    for name, curve in rows.items():
        for row in curve:
            row.update({f'latency_ms_bs{b}': round(latency[name, row['blocks']][b], 4) for b in repeats})
    return rows


def pruning_table(model: nn.Module, data_name: str, order='survival', limit: Optional[int] = None,
                  rows: int = 7, progress: bool = False) -> List[Dict[str, Any]]:
    """Rows (blocks kept, top-1 error %, MACs, ORT CPU latency ms at batch 1 and 64) for a model card.

    At most ``rows`` block counts, evenly spaced from all blocks down to one per stage (every count for
    sd_resnet20), so that a deep net's table costs ``rows`` evaluations rather than one per block.
    """
    counts = depths(model)
    picked = sorted({counts[int(round(i))] for i in np.linspace(0, len(counts) - 1, min(rows, len(counts)))},
                    reverse=True)
    return measure_curves({'model': model}, data_name, order, limit, blocks=picked, progress=progress)['model']


# A label's box as a share of the axes (four characters at font size 7 on a 4-inch-wide panel), and the
# offsets from its point to try, in points: above, then below.
_LABEL_BOX = (0.07, 0.05)
_LABEL_OFFSETS = (7, -7)


def label_errors(ax, curves: Dict[str, List[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """Write each point's error beside it, in its line's colour, on the blocks-kept panel: above the point,
    else below it, else not at all where both would cover a label already written (a dense run of depths).
    Call after plotting the lines, one per curve in order. Returns the rows labelled, in the order written."""
    xs = [r['blocks'] for curve in curves.values() for r in curve]
    ys = [r['top1_err'] for curve in curves.values() for r in curve]
    x0, y0 = min(xs), min(ys)
    x_span, y_span = max(max(xs) - x0, 1), max(max(ys) - y0, 1e-9)
    axes_height_pt = ax.get_position().height * ax.figure.get_figheight() * 72
    colours = [line.get_color() for line in ax.get_lines()]
    # Row by row across the curves, so that every curve's first row (the full net) gets its label.
    rows = sorted(((j, i, r) for i, curve in enumerate(curves.values()) for j, r in enumerate(curve)),
                  key=lambda t: t[:2])
    placed, labelled = [], []
    for _, i, r in rows:
        for offset in _LABEL_OFFSETS:
            box = ((r['blocks'] - x0) / x_span, (r['top1_err'] - y0) / y_span + offset / axes_height_pt)
            if all(abs(box[0] - b[0]) >= _LABEL_BOX[0] or abs(box[1] - b[1]) >= _LABEL_BOX[1] for b in placed):
                placed.append(box)
                labelled.append(r)
                ax.annotate(f'{r["top1_err"]:.1f}', (r['blocks'], r['top1_err']), textcoords='offset points',
                            xytext=(0, offset), ha='center', va='bottom' if offset > 0 else 'top', fontsize=7,
                            color=colours[i])
                break
    return labelled


def plot_curves(curves: Dict[str, List[Dict[str, Any]]], path, title: str = '') -> Path:
    """Test error against blocks kept and against ONNX Runtime CPU latency (batch 1 and 64), one line per model."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4), constrained_layout=True)
    axes = fig.subplots(1, 3, sharey=True)
    x_keys = (('blocks', 'residual blocks kept'), ('latency_ms_bs1', 'ORT CPU latency, batch 1 (ms)'),
              ('latency_ms_bs64', 'ORT CPU latency, batch 64 (ms)'))
    for ax, (key, label) in zip(axes, x_keys):
        for name, curve in curves.items():
            ax.plot([r[key] for r in curve], [r['top1_err'] for r in curve], marker='o', label=name)
        if key == 'blocks':
            label_errors(ax, curves)
        ax.margins(y=0.1)  # room for the labels above the highest and below the lowest point
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel('test top-1 error (%)')
    axes[0].invert_xaxis()
    axes[0].legend()
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def format_table(curves: Dict[str, List[Dict[str, Any]]]) -> str:
    lines = [f'{"model":<28} {"blocks":>6} {"top-1 err %":>11} {"MMACs":>7} {"bs1 ms":>8} {"bs64 ms":>8}  kept']
    for name, curve in curves.items():
        for r in curve:
            lines.append(f'{name:<28} {r["blocks"]:>6} {r["top1_err"]:>11.2f} {r["macs"] / 1e6:>7.2f} '
                         f'{r["latency_ms_bs1"]:>8.3f} {r["latency_ms_bs64"]:>8.2f}  {r["kept"]}')
    return '\n'.join(lines)
