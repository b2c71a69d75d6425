"""`sd-zoo demo`: the whole path in one command, without network.

1. Load pretrained weights: the checkout's ``hub_configs/<model>.<tag>/`` (timm's ``local-dir:`` source, the
   same files ``sd-zoo hub seed-cache`` puts in the Hugging Face cache), else the Hugging Face cache or the
   Hub; with none of them, an untrained model, said loudly, so the rest still runs.
2. Classify: image files given on the command line, else the CIFAR-10 (JPEG-75 copy) test set when the
   data folder is present (a class-balanced subset of ``--limit`` images), else random images.
3. Export the expected-value network to ONNX (``sd_zoo.deploy.onnx_export``) and run it with ONNX Runtime.
4. Print accuracy where labels exist, PyTorch/ONNX Runtime agreement, and timings.

    sd-zoo demo                                   # the best published CIFAR-10 weights on 1,000 test images
    sd-zoo demo cat.png ship.jpg                  # your images (resized to 32x32)
    sd-zoo demo --weights runs/r20/final.safetensors --limit 0     # own weights, whole test set
"""
import argparse
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import data
from ..weights import pretrained
from .args import add_number
from ..errors import ConfigError, DataNotFoundError, WeightsError
from ..evaluation.evaluate import check_num_classes, load_eval_split, model_logits_fn
from ..weights.loader import load_model
from ..deploy.pruning import training_data
from ..ranges import COUNT, NON_NEGATIVE

# Shown where no weights for --data are published: it then runs untrained, saying how to get weights.
FALLBACK_MODEL = 'sd_resnet20.c10j75'


def load_demo_model(name: str, weights: Optional[str] = None) -> Tuple[torch.nn.Module, str, bool]:
    """(model in eval mode, where its weights came from, whether they are trained)."""
    if weights:
        if not Path(weights).exists():  # else the loader would take it for a model name
            raise ConfigError(f'--weights {weights}: no such file or folder; give a Hub folder (hub_configs/NAME) '
                              f'or a .safetensors file written by sd-zoo')
        return load_model(weights), str(weights), True
    try:
        model = load_model(name)
    except WeightsError as e:
        print(f'NOTE: no pretrained weights for {name} here ({e})\n'
              f'NOTE: continuing with an UNTRAINED {name}, so that export and ONNX Runtime still run; '
              f'its accuracy is chance level.')
        return load_model(name, pretrained=False), 'random initialisation (untrained)', False
    shipped = pretrained.SHIPPED_DIR / name
    where = (f'{shipped.parent.name}/{shipped.name}/ of this checkout (the files that `sd-zoo hub seed-cache` '
             f'caches for timm.create_model({name!r}, pretrained=True))' if shipped.is_dir()
             else 'the Hugging Face cache / Hub')
    return model, where, True


def class_names(model) -> Optional[List[str]]:
    """The weights' class names: their config's, else those of the data they record (None where neither says)."""
    names = model.pretrained_cfg.get('label_names')
    if names:
        return list(names)
    # Never guessed from the class count alone: SVHN's 10 digits are not CIFAR-10's 10 classes.
    trained_on = training_data(model)
    names = data.dataset_info(trained_on).classes if trained_on else ()
    return list(names) if len(names) == model.num_classes else None


def load_images(paths: Sequence[str], model) -> torch.Tensor:
    """Image files as one normalised float batch, through timm's eval transform of the model."""
    from PIL import Image, UnidentifiedImageError
    from timm.data import create_transform, resolve_data_config

    transform = create_transform(**resolve_data_config(model=model))
    batch = []
    for p in paths:
        try:
            with Image.open(p) as im:
                batch.append(transform(im.convert('RGB')))
        except (OSError, UnidentifiedImageError) as e:
            raise ConfigError(f'cannot read image {p}: {e}') from None
    return torch.stack(batch)


def demo_inputs(args, model) -> Tuple[Any, Optional[np.ndarray], str]:
    """(images: uint8 NHWC array or normalised float NCHW tensor, labels or None, description)."""
    if args.images:
        return load_images(args.images, model), None, f'{len(args.images)} image file(s)'
    if not args.random:
        try:
            images, labels = load_eval_split(args.data, 'test', args.limit)
        except DataNotFoundError as e:
            print(f'NOTE: {e}\nNOTE: using random images instead (no labels, so no accuracy)')
        else:
            title = data.dataset_info(args.data).title
            return images, labels, (f'{len(labels)} {title} test images (class-balanced subset)' if args.limit
                                    else f'all {len(labels)} {title} test images')
    n = args.random or 64
    size = tuple(model.pretrained_cfg['input_size'])
    images = np.random.default_rng(0).integers(0, 256, (n, size[1], size[2], size[0]), dtype=np.uint8)
    return images, None, f'{n} random images'


def _timed(fn, x, batch_size: int) -> Tuple[float, np.ndarray]:
    """(seconds, outputs) of ``fn`` over ``x`` in batches, after one warm-up call (first-call setup)."""
    fn(x[:1])
    t0 = time.perf_counter()
    out = np.concatenate([np.asarray(fn(x[i:i + batch_size])) for i in range(0, len(x), batch_size)])
    return time.perf_counter() - t0, out


def top1_err(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(100 * (logits.argmax(1) != labels).mean())


def run_demo(args) -> Dict[str, Any]:
    """Run the demo as ``args`` say (the subcommand's options); print as it goes, return the numbers."""
    from ..deploy.onnx_export import export_onnx
    from ..deploy.onnx_runtime import OnnxClassifier, time_interleaved

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    args.model = args.model or pretrained.best_published(args.data) or FALLBACK_MODEL
    model, source, trained = load_demo_model(args.model, args.weights)
    cfg = model.pretrained_cfg
    # Your own weights are named after their file, never after a published tag they are not.
    weights = Path(args.weights) if args.weights else None
    name = (weights.name if weights.is_dir() else weights.stem) if weights else args.model
    print(f'model: {name}, weights from {source}')
    if not (args.images or args.random):  # the test set's labels must be the weights' classes
        check_num_classes(name, model.num_classes, args.data)
    images, labels, what = demo_inputs(args, model)
    print(f'inputs: {what}')

    torch_fn = model_logits_fn(model, cfg['mean'], cfg['std']) if isinstance(images, np.ndarray) else model
    one = images[:1]
    # PyTorch is timed before ONNX Runtime exists: idle ORT worker threads spin for a while after each
    # run and would slow PyTorch's threads down on a small machine.
    with torch.no_grad():
        torch_s, torch_logits = _timed(lambda x: torch_fn(torch.as_tensor(x)).numpy(), images, args.batch_size)
        torch_latency = time_interleaved({'pytorch': lambda: torch_fn(torch.as_tensor(one))}, args.repeats)

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(args.onnx) if args.onnx else Path(tmp) / f'{name}.onnx'
        t0 = time.perf_counter()
        report = export_onnx(model, onnx_path, mean=cfg['mean'], std=cfg['std'])
        export_s = time.perf_counter() - t0
        print(f'ONNX: exported {onnx_path.name} ({report.size_bytes / 2 ** 20:.1f} MiB, opset {report.opset}, '
              f'{report.exporter}) in {export_s:.1f} s' + (f' -> {onnx_path}' if args.onnx else ''))
        session = OnnxClassifier(onnx_path, threads=args.num_threads)
        ort_s, ort_logits = _timed(lambda x: session(np.asarray(x)), images, args.batch_size)
        ort_latency = time_interleaved({'onnxruntime': lambda: session(np.asarray(one))}, args.repeats)
    latency = dict(torch_latency, **ort_latency)

    n = len(torch_logits)
    result = dict(
        model=name, source=source, trained=trained, inputs=what, n=n,
        agreement=float(100 * (torch_logits.argmax(1) == ort_logits.argmax(1)).mean()),
        max_abs_diff=float(np.abs(torch_logits - ort_logits).max()),
        # Relative too: an untrained deep net's logits reach 1e5, where float32 rounding alone differs by 1.
        max_rel_diff=float(np.abs(torch_logits - ort_logits).max() / max(np.abs(torch_logits).max(), 1e-12)),
        pytorch_ms_per_image=1000 * torch_s / n, onnxruntime_ms_per_image=1000 * ort_s / n,
        pytorch_latency_ms=1000 * float(np.median(latency['pytorch'])),
        onnxruntime_latency_ms=1000 * float(np.median(latency['onnxruntime'])),
        export_s=export_s, predictions=torch_logits.argmax(1).tolist())
    if labels is not None:
        result.update(pytorch_top1_err=top1_err(torch_logits, labels),
                      onnxruntime_top1_err=top1_err(ort_logits, labels))
        print(f'accuracy: PyTorch {100 - result["pytorch_top1_err"]:.2f}% '
              f'(top-1 error {result["pytorch_top1_err"]:.2f}%), '
              f'ONNX Runtime {100 - result["onnxruntime_top1_err"]:.2f}% on {n} images'
              + ('' if trained else ' (untrained model: chance level)'))
    if args.images:
        names = class_names(model)
        if names is None:
            print(f'NOTE: {name} records neither class names nor its training data: classes are shown by number')
        probs = torch.as_tensor(torch_logits).softmax(-1)
        for path, p in zip(args.images, probs):
            top = p.topk(min(3, len(p)))
            shown = ', '.join(f'{names[i] if names else i} {100 * v:.1f}%'
                              for v, i in zip(top.values.tolist(), top.indices.tolist()))
            print(f'  {path}: {shown}')
    print(f'agreement: PyTorch and ONNX Runtime pick the same class for {result["agreement"]:.1f}% of {n} images, '
          f'max |logit difference| {result["max_abs_diff"]:.2g} ({result["max_rel_diff"]:.1g} of the largest |logit|)')
    print(f'timing: PyTorch {result["pytorch_ms_per_image"]:.2f} ms/image, ONNX Runtime '
          f'{result["onnxruntime_ms_per_image"]:.2f} ms/image (batches of {args.batch_size}); batch-1 latency '
          f'PyTorch {result["pytorch_latency_ms"]:.2f} ms, ONNX Runtime {result["onnxruntime_latency_ms"]:.2f} ms '
          f'(median of {args.repeats}), {torch.get_num_threads()} torch thread(s)')
    return result


def run(args: argparse.Namespace) -> int:
    run_demo(args)
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        'demo', help='load shipped weights, classify, export to ONNX and compare with ONNX Runtime',
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('images', nargs='*', metavar='IMAGE', help='image files to classify (default: the test set)')
    p.add_argument('--model', help='pretrained name model.tag (default: the published weights of lowest test error '
                                   f'on --data, as sd_zoo/weights/published.json records; {FALLBACK_MODEL} where none is)')
    p.add_argument('--weights', help='a hub folder (hub_configs/NAME) or a safetensors file to use instead')
    p.add_argument('--data', default='cifar10-jpeg75', help='test set when no images are given (default: %(default)s)')
    add_number(p, '--limit', bound=NON_NEGATIVE, default=1000,
               help='class-balanced subset of the test set, 0 for all (default: %(default)s)')
    add_number(p, '--random', bound=COUNT, metavar='N', help='classify N random images instead of the test set')
    p.add_argument('--onnx', metavar='PATH', help='keep the exported ONNX file here (default: a temporary file)')
    add_number(p, '--batch-size', bound=COUNT, default=250)
    add_number(p, '--repeats', bound=COUNT, default=20, help='runs of the batch-1 latency timing')
    add_number(p, '--num-threads', bound=COUNT, help='threads for torch and ONNX Runtime (default: theirs)')
    p.set_defaults(func=run)
