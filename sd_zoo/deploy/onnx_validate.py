"""`sd-zoo validate`: score an exported ONNX classifier on a CIFAR split with ONNX Runtime.

Reports the top-1 / top-5 error of the ONNX graph. Given the PyTorch weights it came from
(``--checkpoint`` or ``--model NAME.TAG --pretrained``), it also reports how often the two agree on
the top-1 class and their largest logit difference; the PyTorch model is rebuilt with the survival
probabilities stored in the ONNX file, so both sides compute the same expected-value network.
``--compare OTHER.onnx`` does the same against another ONNX file (fp16 against fp32, for example).
"""
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

import numpy as np

from .. import data
from ..errors import ConfigError, ExportError
from .onnx_runtime import OnnxClassifier


def check_fits_dataset(clf: OnnxClassifier, data_name: str, image_shape) -> None:
    """Raise :class:`ExportError` if the graph cannot classify this dataset's images."""
    n_classes = data.num_classes(data_name)
    h, w, c = image_shape
    _, chans, height, width = clf.input_shape
    problems = []
    if chans is not None and chans != c:
        problems.append(f'it takes {chans}-channel input, the images have {c} channels')
    if (height, width) != (None, None) and (height, width) != (h, w):
        problems.append(f'it takes {height}x{width} input, the images are {h}x{w}')
    if clf.num_classes is not None and clf.num_classes != n_classes:
        problems.append(f'it has {clf.num_classes} outputs, {data_name} has {n_classes} classes')
    if problems:
        raise ExportError(f'{clf.path.name} does not fit {data_name}: {"; ".join(problems)}')


def pytorch_reference(clf: OnnxClassifier, model_name: Optional[str] = None, checkpoint: Optional[str] = None,
                      pretrained: bool = False) -> Tuple[Callable[[Any], Any], str]:
    """uint8 -> logits of the PyTorch model an ONNX file was exported from, with the same normalisation, and
    the name of its weights (``sd_zoo.weights.loader.Provenance``)."""
    from ..evaluation.evaluate import model_logits_fn
    from ..weights.loader import Provenance
    from .onnx_export import build_model

    if checkpoint is None and not pretrained:
        raise ConfigError('the PyTorch reference needs weights: give --checkpoint FILE or --pretrained')
    # The settings the graph was exported with, whatever the weights file or tag says.
    model, facts = build_model(model_name, pretrained, checkpoint, clf.metadata.get('model_args'))
    if clf.mean is None:
        raise ExportError(f'{clf.path.name} stores no mean/std to normalise the PyTorch input with')
    named = Provenance(facts['model'], checkpoint or facts['source'], facts['weights_sha256'])
    return model_logits_fn(model, clf.mean, clf.std), f'PyTorch {named}'


def validate_onnx(path: Union[str, Path, OnnxClassifier], data_name: str = 'cifar10-jpeg75', split: str = 'test',
                  limit: Optional[int] = None, batch_size: int = 500, provider: str = 'cpu',
                  reference: Optional[Callable[[Any], Any]] = None) -> Dict[str, Any]:
    """Top-1 / top-5 error of an ONNX file (or an open :class:`OnnxClassifier`) on a dataset split, and its
    agreement with ``reference``: a uint8 batch [B, H, W, C] -> logits map (a PyTorch model through
    :func:`pytorch_reference`, or another :class:`OnnxClassifier`).
    """
    from ..evaluation.evaluate import evaluate, load_eval_split

    clf = path if isinstance(path, OnnxClassifier) else OnnxClassifier(path, provider)
    images, labels = load_eval_split(data_name, split, limit)
    check_fits_dataset(clf, data_name, images.shape[1:])
    pairs = []  # (ONNX logits, reference logits) per batch

    def logits_fn(batch):
        out = clf(batch)
        if reference is not None:
            ref = reference(batch)
            pairs.append((out, ref.detach().cpu().numpy() if hasattr(ref, 'detach') else np.asarray(ref)))
        return out

    result = evaluate(logits_fn, images, labels, batch_size)
    result.update(data=data_name, split=split, onnx=clf.path.name, provider=clf.provider)
    if pairs:
        out, ref = (np.concatenate(a) for a in zip(*pairs))
        result.update(top1_agreement=100.0 * float((out.argmax(1) == ref.argmax(1)).mean()),
                      max_abs_diff=float(np.abs(out - ref).max()), reference_logit_scale=float(np.abs(ref).max()))
    return result


def format_result(r: Dict[str, Any], reference_name: Optional[str] = None) -> str:
    title = data.dataset_info(r['data']).title
    line = (f'{r["onnx"]} on {title} {r["split"]} ({r["n"]} images, ONNX Runtime {r["provider"]}): '
            f'top-1 error {r["top1_err"]:.2f}%, top-5 error {r["top5_err"]:.2f}%')
    if 'top1_agreement' in r:
        line += (f'\n  against {reference_name}: top-1 agreement {r["top1_agreement"]:.2f}%, max |logit difference| '
                 f'{r["max_abs_diff"]:.3g} (logit scale {r["reference_logit_scale"]:.3g})')
    return line
