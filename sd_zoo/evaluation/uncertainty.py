"""Uncertainty from depth: Monte-Carlo depth ensembles, calibration metrics and reliability diagrams.

The paper reads stochastic depth as training an implicit ensemble of networks of different depths. At
test time the same gates can be drawn again, as MC dropout does for dropout nets: N forward passes,
each through a randomly shortened network, average into a predictive distribution whose spread says how
sure the model is. :func:`mc_predict` does that with BatchNorm in eval mode and the gates drawn exactly
as in training (the model's own gate and rule), so for every block the mean pre-activation over samples
is the expected-value net's. A constant-depth model (every p_l = 1) gives N identical passes.

:func:`calibration_metrics` scores any class probabilities: top-1 error, NLL, Brier score, expected
calibration error (15 equal-width bins), the error on the most confident 90, 80, 20, 10 and 1 % of the
images, and the area under the risk-coverage curve. :func:`calibration_report` compares the expected-value
net, the same net with a temperature fitted on validation images held out of the training split, and the N-sample depth
ensemble; ``sd-zoo eval --mc-samples N`` prints it.
"""
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .. import data
from ..errors import ConfigError
from .evaluate import check_model_fits, load_eval_split, model_logits_fn
from ..models.stochastic_depth import StochasticDepth, check_gate_generator

ECE_BINS = 15
# Shares of the most confident images to report the error on: the high ones say what abstaining on a few
# images buys; the low ones whether the net is wrong where it is surest, which the AURC averages away.
COVERAGES = (0.9, 0.8, 0.2, 0.1, 0.01)
# The model's own attributes that gate planning writes (the planning generator, the last batch's gates).
_MODEL_GATE_ATTRS = ('_gate_generator', '_last_gates')


class MCPrediction(NamedTuple):
    """Per-image output of :func:`mc_predict` (float64)."""
    probs: torch.Tensor        # [B, C] mean of the sampled softmax outputs
    entropy: torch.Tensor      # [B] predictive entropy H[mean p], nats
    mutual_info: torch.Tensor  # [B] H[mean p] - mean H[p]: the part of the entropy due to disagreement between depths


def gated_blocks(model: nn.Module) -> List[nn.Module]:
    """Residual blocks with a stochastic-depth gate (a ``stochastic_depth`` attribute); ConfigError if none."""
    blocks = [m for m in model.modules() if isinstance(getattr(m, 'stochastic_depth', None), StochasticDepth)]
    if not blocks:
        raise ConfigError(f'{type(model).__name__} has no stochastic-depth gates, so there are no depths to '
                          f'sample; use an sd-zoo model (e.g. sd_resnet110) trained with drop_path_rate > 0')
    return blocks


@contextmanager
def depth_sampling(model: nn.Module, generator: Optional[torch.Generator] = None) -> Iterator[Callable]:
    """Yield ``sample(x) -> logits``: one forward pass of ``model`` with freshly drawn stochastic-depth gates.

    Only the gated blocks' own ``training`` flags are set, so they take the training path (gates drawn,
    dropped branches skipped) while BatchNorm, dropout and everything else run in eval mode. Gates come
    from ``generator`` (a CPU ``torch.Generator``), or from torch's global RNG if None. On exit the model
    is as before: training flags, gate generators, planned gates and gate statistics.
    """
    blocks = gated_blocks(model)
    check_gate_generator(generator)
    gates = [b.stochastic_depth for b in blocks]
    flags = [(m, m.training) for m in model.modules()]
    gate_state = [(g.generator, g.planned, g.num_calls, g.num_executed) for g in gates]
    model_state = {k: model.__dict__[k] for k in _MODEL_GATE_ATTRS if k in model.__dict__}
    plan = getattr(model, 'plan_gates', None)

    def sample(x: torch.Tensor) -> torch.Tensor:
        if plan is not None:  # an sd-zoo model draws all gates of a pass in one RNG call, as in training
            plan(x.shape[0])
        return model(x)

    try:
        model.eval()
        for b in blocks:
            b.training = True
            b.stochastic_depth.generator = generator
        if plan is not None:
            model._gate_generator = generator
        yield sample
    finally:
        for m, flag in flags:
            m.training = flag
        for g, (gen, planned, calls, executed) in zip(gates, gate_state):
            g.generator, g.planned, g.num_calls, g.num_executed = gen, planned, calls, executed
        for k in _MODEL_GATE_ATTRS:
            model.__dict__.pop(k, None)
        model.__dict__.update(model_state)


def _check_samples(samples: int) -> None:
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ConfigError(f'the number of depth samples must be a positive integer, got {samples!r}; '
                          f'30 is a good start (each sample is one forward pass)')


@torch.no_grad()
def mc_predict(model: nn.Module, x: torch.Tensor, samples: int = 30,
               generator: Optional[torch.Generator] = None) -> MCPrediction:
    """Monte-Carlo depth ensemble: ``samples`` forward passes of the normalised batch ``x``, each with its own
    draw of the gates (from the CPU ``generator``, or torch's global RNG if None). ``model`` may be in any
    mode: it runs with BatchNorm in eval mode and is left unchanged.
    """
    _check_samples(samples)
    # Where every p_l is 1 (constant depth) all passes are the same network: one pass is the whole ensemble.
    passes = 1 if all(float(b.stochastic_depth.survival_prob) == 1.0 for b in gated_blocks(model)) else samples
    total = entropy_sum = 0.0
    with depth_sampling(model, generator) as sample:
        for _ in range(passes):
            p = sample(x).double().softmax(dim=1)
            total += p
            entropy_sum += torch.special.entr(p).sum(dim=1)
    probs = total / passes
    entropy = torch.special.entr(probs).sum(dim=1)
    # Non-negative by Jensen's inequality; the clamp removes rounding noise when all samples agree.
    mutual_info = (entropy - entropy_sum / passes).clamp_min(0.0)
    return MCPrediction(probs, entropy, mutual_info)


# --- metrics on class probabilities [N, C] and labels [N] -------------------------------------------------

def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> Dict[str, torch.Tensor]:
    """Per equal-width confidence bin ((k/bins, (k+1)/bins]): image count, mean confidence, accuracy."""
    conf, pred = probs.double().max(dim=1)
    correct = (pred == labels).double()
    idx = torch.bucketize(conf, torch.linspace(0, 1, bins + 1, dtype=torch.float64)[1:-1])
    count = torch.bincount(idx, minlength=bins).double()
    safe = count.clamp_min(1)  # an empty bin gets accuracy and confidence 0
    return dict(count=count,
                confidence=torch.bincount(idx, conf, minlength=bins) / safe,
                accuracy=torch.bincount(idx, correct, minlength=bins) / safe)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """|accuracy - mean confidence| per bin, weighted by the bin's share of images, in percent."""
    b = reliability_bins(probs, labels, bins)
    return float(100 * (b['count'] / b['count'].sum() * (b['accuracy'] - b['confidence']).abs()).sum())


def risk_coverage(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Error rate among the k most confident images, for k = 1..N (ties keep the images' order)."""
    conf, pred = probs.double().max(dim=1)
    order = torch.sort(conf, descending=True, stable=True).indices
    wrong = (pred[order] != labels[order]).double()
    return wrong.cumsum(0) / torch.arange(1, len(wrong) + 1, dtype=torch.float64)


def error_at_coverage(probs: torch.Tensor, labels: torch.Tensor, coverage: float) -> float:
    """Top-1 error (percent) on the most confident ``coverage`` share of the images (rounded up to whole images)."""
    return _risk_at(risk_coverage(probs, labels), coverage)


def _risk_at(risk: torch.Tensor, coverage: float) -> float:
    keep = max(1, math.ceil(round(coverage * len(risk), 6)))  # the inner round: 0.9 * 10 is 9.000000000000002
    return float(100 * risk[keep - 1])


def calibration_metrics(probs: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    """Top-1 error, NLL, Brier score, ECE (15 bins) and selective-prediction metrics of probabilities [N, C].

    NLL of the true class in nats per image; Brier score summed over classes (0 perfect, 2 the worst); AURC,
    the area under the risk-coverage curve, as the mean error rate over coverages k/N (a fraction, 0 to 1).
    """
    probs, labels = probs.double(), torch.as_tensor(labels).long()
    p_true = probs.gather(1, labels[:, None]).squeeze(1)
    result = dict(top1_err=float(100 * (probs.argmax(dim=1) != labels).double().mean()),
                  nll=float(-p_true.clamp_min(torch.finfo(torch.float64).tiny).log().mean()),
                  brier=float((probs - F.one_hot(labels, probs.shape[1])).square().sum(dim=1).mean()),
                  ece=expected_calibration_error(probs, labels))
    risk = risk_coverage(probs, labels)  # one sort serves every coverage and the AURC
    for c in COVERAGES:
        result[f'err_at_{round(100 * c)}_coverage'] = _risk_at(risk, c)
    result['aurc'] = float(risk.mean())
    return result


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T > 0 minimising the NLL of ``softmax(logits / T)`` (LBFGS on log T)."""
    logits, labels = logits.detach().double(), torch.as_tensor(labels).long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn='strong_wolfe')

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return float(log_t.detach().exp())


# --- datasets ------------------------------------------------------------------------------------------------

def _chunks(images, batch_size: int, desc: str, progress: bool):
    images = torch.as_tensor(images)
    with tqdm(total=len(images), desc=desc, unit='img', disable=not progress, leave=False) as bar:
        for chunk in images.split(batch_size):
            yield chunk
            bar.update(len(chunk))


def eval_logits(model: nn.Module, images, mean: Sequence[float], std: Sequence[float], batch_size: int = 1000,
                progress: bool = True) -> torch.Tensor:
    """Logits [N, C] (CPU, float32) of the expected-value net for uint8 images [N, 32, 32, 3]."""
    fn = model_logits_fn(model, mean, std)
    return torch.cat([fn(chunk).cpu() for chunk in _chunks(images, batch_size, 'deterministic', progress)])


def mc_predict_images(model: nn.Module, images, mean: Sequence[float], std: Sequence[float], samples: int,
                      batch_size: int = 1000, generator: Optional[torch.Generator] = None,
                      progress: bool = True) -> MCPrediction:
    """:func:`mc_predict` over uint8 images [N, 32, 32, 3], ``batch_size`` images per forward pass.

    With the batch gate (the paper's) every pass draws one gate per block for its ``batch_size`` images,
    as a training mini-batch does.
    """
    device = next(model.parameters()).device
    parts = [mc_predict(model, data.normalize(chunk.to(device), mean, std), samples, generator)
             for chunk in _chunks(images, batch_size, f'{samples} depth samples', progress)]
    return MCPrediction(*(torch.cat(field).cpu() for field in zip(*parts)))


def calibration_report(model: nn.Module, data_name: str, samples: int, mean: Sequence[float],
                       std: Sequence[float], limit: Optional[int] = None, batch_size: int = 1000,
                       generator: Optional[torch.Generator] = None, root=None,
                       progress: bool = True) -> Dict[str, object]:
    """Calibration of the expected-value net, of it with a fitted temperature, and of an N-sample depth ensemble.

    The temperature is fitted on the validation images held out of the training split (``limit`` of them,
    class-balanced, if given); all metrics are measured on the test split (``limit`` images if given).
    Returns a JSON-able dict with keys ``deterministic``, ``temperature_scaled`` and ``mc`` (each holding
    the :func:`calibration_metrics`), ``temperature``, ``samples``, ``n``, ``val_n`` and the mean entropy
    and mutual information of the ensemble on correctly and wrongly classified images.
    """
    _check_samples(samples)
    gated_blocks(model)  # its clear error before any data is read
    check_model_fits(model, data_name)
    # The validation part holds VAL_SIZE images; a larger --limit (meant for the test split) takes them all.
    val_x, val_y = data.split_part(data_name, 'val', min(limit, data.VAL_SIZE) if limit else None, root)
    test_x, test_y = load_eval_split(data_name, 'test', limit, root)
    val_y, test_y = torch.as_tensor(val_y), torch.as_tensor(test_y)
    temperature = fit_temperature(eval_logits(model, val_x, mean, std, batch_size, progress), val_y)
    logits = eval_logits(model, test_x, mean, std, batch_size, progress).double()
    mc = mc_predict_images(model, test_x, mean, std, samples, batch_size, generator, progress)
    probs = dict(deterministic=logits.softmax(dim=1), temperature_scaled=(logits / temperature).softmax(dim=1),
                 mc=mc.probs)
    report = {key: calibration_metrics(p, test_y) for key, p in probs.items()}
    wrong = mc.probs.argmax(dim=1) != test_y
    report['uncertainty'] = {f'{name}_{kind}': float(values[mask].mean()) if mask.any() else None
                             for name, values in (('entropy', mc.entropy), ('mutual_info', mc.mutual_info))
                             for kind, mask in (('correct', ~wrong), ('wrong', wrong))}
    bins = {key: reliability_bins(p, test_y) for key, p in probs.items()}
    report.update(temperature=temperature, samples=samples, n=len(test_y), val_n=len(val_y),
                  reliability={key: {k: v.tolist() for k, v in b.items()} for key, b in bins.items()})
    return report


# --- output --------------------------------------------------------------------------------------------------

_ROWS = (('deterministic', 'expected-value net'), ('temperature_scaled', 'temperature-scaled'), ('mc', 'MC ensemble'))


def format_report(report: Dict[str, object], title: str) -> str:
    """The comparison as a plain-text table."""
    coverages = [round(100 * c) for c in COVERAGES]
    lines = [title, f'{"":<22}{"top-1 err":>10}{"NLL":>8}{"Brier":>8}{"ECE":>8}'
                    + ''.join(f'{f"err@{c}%":>9}' for c in coverages) + f'{"AURC":>8}']
    for key, label in _ROWS:
        m = report[key]
        label = f'{label} ({report["samples"]})' if key == 'mc' else label
        lines.append(f'{label:<22}{m["top1_err"]:>9.2f}%{m["nll"]:>8.4f}{m["brier"]:>8.4f}{m["ece"]:>7.2f}%'
                     + ''.join(f'{m[f"err_at_{c}_coverage"]:>8.2f}%' for c in coverages) + f'{m["aurc"]:>8.4f}')
    mi = ['none' if v is None else f'{v:.4f}' for v in (report['uncertainty'][f'mutual_info_{k}']
                                                           for k in ('correct', 'wrong'))]
    lines.append(f'temperature T = {report["temperature"]:.4f} (fitted on {report["val_n"]} validation images '
                 f'held out of training); ensemble mutual information, correct / wrong: {mi[0]} / {mi[1]} nats')
    return '\n'.join(lines)


def plot_reliability(report: Dict[str, object], path: Union[str, Path], title: str = '') -> Path:
    """Reliability diagrams side by side (expected-value net, temperature-scaled, MC ensemble) as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, safe in threads and on servers

    fig = Figure(figsize=(11, 3.9))
    axes = fig.subplots(1, len(_ROWS), sharey=True)
    width = 1.0 / ECE_BINS
    left = np.arange(ECE_BINS) * width
    for ax, (key, label) in zip(axes, _ROWS):
        bins = report['reliability'][key]
        acc, conf = np.asarray(bins['accuracy']), np.asarray(bins['confidence'])
        ax.bar(left, acc, width=width, align='edge', color='tab:blue', edgecolor='white', label='accuracy')
        # The gap to the bin's mean confidence: above the bar the model is over-confident, below under-confident.
        ax.bar(left, conf - acc, bottom=acc, width=width, align='edge', color='tab:red', alpha=0.3,
               edgecolor='tab:red', hatch='//', label='gap to confidence')
        ax.plot([0, 1], [0, 1], color='grey', linestyle='--', linewidth=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel='confidence')
        name = f'{label} ({report["samples"]} samples)' if key == 'mc' else label
        if key == 'temperature_scaled':
            name += f', T = {report["temperature"]:.2f}'
        ax.set_title(f'{name}\nECE {report[key]["ece"]:.2f} %, NLL {report[key]["nll"]:.3f}', fontsize=9)
    axes[0].set_ylabel('accuracy')
    axes[0].legend(loc='upper left', fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
