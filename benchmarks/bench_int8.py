"""int8 against fp32 ONNX Runtime CPU latency (batch 1 and 64) and the accuracy change, in one run.

Exports the published weights (optionally depth-pruned) to fp32 ONNX, quantizes them as
``sd-zoo export --int8`` does (QDQ, per-channel int8 weights, uint8 activations, calibrated on
training images), scores both graphs on the test split, and times them interleaved (median of repeats,
one process, ``--threads`` intra-op threads for both). With ``--keep-blocks`` the unpruned fp32 graph is
timed in the same loop, the baseline of both pruned graphs.

    python benchmarks/bench_int8.py [--model sd_resnet20.c10j75] [--keep-blocks N] [--data cifar10-jpeg75]
                                    [--limit N] [--threads 1] [--repeats 300 --repeats-64 40] [--weight-bits 7]
"""
import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime

from sd_zoo.deploy.onnx_export import export_onnx
from sd_zoo.deploy.onnx_runtime import OnnxClassifier, time_interleaved
from sd_zoo.deploy.quantize import DEFAULT_WEIGHT_BITS, WEIGHT_BITS, compare_on_test, quantize_int8


def cpu_int8_dot() -> str:
    """Whether this x86 CPU has VNNI, without which 8-bit int8 weights saturate (see sd_zoo.deploy.quantize)."""
    try:
        lines = Path('/proc/cpuinfo').read_text().splitlines()
        flags = next(line for line in lines if line.startswith('flags')).split()
    except (OSError, StopIteration):
        return 'VNNI unknown'
    return 'VNNI' if {'avx512_vnni', 'avx_vnni', 'amx_int8'} & set(flags) else 'no VNNI'


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='sd_resnet20.c10j75')
    parser.add_argument('--keep-blocks', type=int, help='depth-prune to N blocks first (survival order)')
    parser.add_argument('--data', default='cifar10-jpeg75')
    parser.add_argument('--limit', type=int, help='test images scored (default: the whole split)')
    parser.add_argument('--calibration-images', type=int, default=512)
    parser.add_argument('--weight-bits', type=int, choices=WEIGHT_BITS, default=DEFAULT_WEIGHT_BITS,
                        help='as sd-zoo export --int8-weight-bits')
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--repeats', type=int, default=300, help='timed calls at batch 1')
    parser.add_argument('--repeats-64', type=int, default=40, help='timed calls at batch 64')
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp) / 'fp32.onnx', Path(tmp) / 'int8.onnx'
        export_onnx(args.model, fp32, pretrained=True, keep_blocks=args.keep_blocks)
        quantize_int8(fp32, int8, args.data, args.calibration_images, weight_bits=args.weight_bits)
        report = compare_on_test(fp32, int8, args.data, args.limit, args.calibration_images)
        graphs = dict(fp32=fp32, int8=int8)
        if args.keep_blocks:
            graphs['full'] = Path(tmp) / 'full.onnx'
            export_onnx(args.model, graphs['full'], pretrained=True)
        sessions = {k: OnnxClassifier(p, threads=args.threads) for k, p in graphs.items()}
        print(f'{args.model}{f" pruned to {args.keep_blocks} blocks" if args.keep_blocks else ""}, ONNX Runtime '
              f'{onnxruntime.__version__} CPU ({cpu_int8_dot()}), {args.threads} thread(s), {args.weight_bits}-bit '
              f'int8 weights, load average {os.getloadavg()[0]:.2f}')
        full_header = f' {"full fp32 ms":>12} {"fp32/full":>9} {"int8/full":>9}' if args.keep_blocks else ''
        print(f'{"batch":>5} {"fp32 ms":>9} {"int8 ms":>9} {"int8/fp32":>9}{full_header}  repeats')
        rng = np.random.default_rng(0)
        for batch, repeats in ((1, args.repeats), (64, args.repeats_64)):
            x = rng.standard_normal((batch, 3, 32, 32), dtype=np.float32)
            times = time_interleaved({k: (lambda s=s: s(x)) for k, s in sessions.items()}, repeats)
            ms = {k: 1000 * float(np.median(t)) for k, t in times.items()}
            fp, q = ms['fp32'], ms['int8']
            full = f' {ms["full"]:>12.3f} {fp / ms["full"]:>9.3f} {q / ms["full"]:>9.3f}' if args.keep_blocks else ''
            print(f'{batch:>5} {fp:>9.3f} {q:>9.3f} {q / fp:>9.3f}{full}  {repeats}')
    print(f'test top-1 error on {report.data} ({report.n} images): fp32 {report.fp32_top1_err:.2f}%, int8 '
          f'{report.int8_top1_err:.2f}% ({report.drop:+.2f} points); same class on {report.top1_agreement:.2f}%; '
          f'file {report.fp32_size_bytes / 2 ** 20:.2f} -> {report.size_bytes / 2 ** 20:.2f} MiB')


if __name__ == '__main__':
    main()
