#!/usr/bin/env python3
"""CPU latency of an sd-zoo model: PyTorch eager against ONNX Runtime fp32, measured in one run.

    python benchmarks/onnx_benchmark.py --model sd_resnet110 --batch-sizes 1 64

Exports the model (random weights, or ``--checkpoint``) to a temporary file, then times PyTorch eager
(``inference_mode``) and the ONNX Runtime session of ``sd_zoo.deploy.onnx_runtime.OnnxClassifier``
round-robin at each batch size, so that load from other processes hits both alike, and reports the
median of the repeats and the speed-up. Both use the same number of threads (one per physical core
unless ``--threads``); ORT's worker threads do not spin between runs, so that they take no cores
from PyTorch. The load average is printed with the results: on a shared machine it says how far to
trust them (PyTorch's OpenMP threads degrade badly when the cores are oversubscribed; ``--threads 1``
is the robust comparison there).
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sd_zoo import load_model  # noqa: E402
from sd_zoo.deploy.onnx_export import export_onnx  # noqa: E402
from sd_zoo.deploy.onnx_runtime import OnnxClassifier, import_onnxruntime, physical_cores, time_interleaved  # noqa: E402


def benchmark(model_name='sd_resnet110', checkpoint=None, batch_sizes=(1, 64), repeats=None, threads=None):
    """One result dict per batch size: median ms of eager and ORT, the speed-up and their max difference."""
    threads = threads or physical_cores()
    torch.set_num_threads(threads)
    model = load_model(checkpoint) if checkpoint else load_model(model_name, pretrained=False)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / 'model.onnx'
        export_onnx(model, onnx_path)
        # ORT's idle workers would otherwise busy-wait between runs and slow the interleaved PyTorch calls.
        clf = OnnxClassifier(onnx_path, threads=threads, spinning=False)
        results = []
        for bs in batch_sizes:
            x = torch.randn(bs, *clf.input_shape[1:], generator=torch.Generator().manual_seed(bs))
            x_np = x.numpy()
            with torch.inference_mode():
                times = time_interleaved(
                    {'eager': lambda: model(x), 'ort': lambda: clf(x_np)},
                    # PyTorch's OpenMP threads take a few calls to settle on a busy machine.
                    repeats=repeats or (25 if bs <= 8 else 7), warmup=5)
                ref = model(x).numpy()
                diff = float(np.abs(ref - clf(x_np)).max()) / max(1.0, float(np.abs(ref).max()))
            eager, ort = (1e3 * statistics.median(times[k]) for k in ('eager', 'ort'))
            results.append(dict(batch=bs, eager_ms=eager, ort_ms=ort, speedup=eager / ort,
                                repeats=len(times['ort']), max_rel_diff=diff))
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='sd_resnet110')
    p.add_argument('--checkpoint', help='safetensors weights of --model (default: random initialisation)')
    p.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 64])
    p.add_argument('--repeats', type=int, help='timed rounds per batch size (default 25 for batch <= 8, else 7)')
    p.add_argument('--threads', type=int, help='threads for both back ends (default: physical cores)')
    p.add_argument('--json', help='also write the results to this JSON file')
    args = p.parse_args(argv)

    load_before = os.getloadavg()
    results = benchmark(args.model, args.checkpoint, args.batch_sizes, args.repeats, args.threads)
    load_after = os.getloadavg()
    ort = import_onnxruntime()
    env = dict(cpu=platform.processor() or platform.machine(), physical_cores=physical_cores(),
               threads=args.threads or physical_cores(), torch=torch.__version__, onnxruntime=ort.__version__,
               load_avg_1min=[round(load_before[0], 2), round(load_after[0], 2)])
    print(f'{args.model}, CPU, {env["threads"]} threads, torch {env["torch"]}, onnxruntime {env["onnxruntime"]}, '
          f'load average {env["load_avg_1min"][0]} -> {env["load_avg_1min"][1]}')
    print(f'{"batch":>5}  {"eager ms":>9}  {"ORT fp32 ms":>11}  {"speed-up":>8}  {"max rel diff":>12}  repeats')
    for r in results:
        print(f'{r["batch"]:>5}  {r["eager_ms"]:>9.2f}  {r["ort_ms"]:>11.2f}  {r["speedup"]:>7.2f}x  '
              f'{r["max_rel_diff"]:>12.2g}  {r["repeats"]}')
    report = dict(model=args.model, env=env, results=results)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
    return 0


if __name__ == '__main__':
    sys.exit(main())
