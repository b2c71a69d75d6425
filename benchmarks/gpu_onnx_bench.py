#!/usr/bin/env python3
"""GPU benchmark of an exported sd-zoo model: ONNX Runtime CUDA (fp32, fp16) against PyTorch eager and
torch.compile, at batch 1 and 256, with parity and run-to-run bit-identity checks. One command:

    python benchmarks/gpu_onnx_bench.py                 # writes $OUT/gpu_onnx_bench.json (or ./)
    python benchmarks/gpu_onnx_bench.py --dry-run       # CPU only: checks the script runs, no CUDA

Needs onnxruntime-gpu (``CUDAExecutionProvider``) and a CUDA build of torch. The model is
sd_resnet110 at random initialisation with BatchNorm statistics from a few training-mode batches, so
that parity is not checked against identity BatchNorms. PyTorch runs with TF32 off and ORT with
``use_tf32=0``, so fp32 results are comparable; latencies are medians of round-robin repeats with the
input already on the device (ORT through IOBinding), synchronised before each clock read.
Every section records an error in the JSON instead of stopping the run; the whole run stays well
under five minutes on an H100 (torch.compile of two shapes is most of it).
"""
import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402

from sd_zoo.onnx_export import export_onnx  # noqa: E402
from sd_zoo.onnx_runtime import OnnxClassifier, import_onnxruntime, time_interleaved  # noqa: E402


def calibrated_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A fresh model whose BatchNorms carry running statistics of real activations (not 0 / 1)."""
    torch.manual_seed(seed)
    model = timm.create_model(name)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(64, 3, 32, 32))
    return model.eval()


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def to_numpy(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def section(results: dict, name: str, fn) -> None:
    """Run one part of the benchmark; a failure is recorded and the others still run."""
    start = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as e:  # a benchmark records every failure rather than stopping
        results[name] = dict(error=f'{type(e).__name__}: {e}', traceback=traceback.format_exc(limit=4))
    results[name + '_seconds'] = round(time.perf_counter() - start, 2)
    print(f'{name}: {json.dumps(results[name])[:400]}', flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default=None, help='default sd_resnet110 (sd_resnet20 with --dry-run)')
    p.add_argument('--batch-sizes', type=int, nargs='+', default=None, help='default 1 256 (1 8 with --dry-run)')
    p.add_argument('--repeats', type=int, default=None, help='timed rounds per batch size (default 30; 3 dry-run)')
    p.add_argument('--output', help='JSON file (default $OUT/gpu_onnx_bench.json, else ./gpu_onnx_bench.json)')
    p.add_argument('--dry-run', action='store_true', help='CPU only, small model, no CUDA and no torch.compile')
    args = p.parse_args(argv)
    dry = args.dry_run
    model_name = args.model or ('sd_resnet20' if dry else 'sd_resnet110')
    batch_sizes = args.batch_sizes or ([1, 8] if dry else [1, 256])
    repeats = args.repeats or (3 if dry else 30)
    out_path = Path(args.output or Path(os.environ.get('OUT', '.')) / 'gpu_onnx_bench.json')

    ort = import_onnxruntime()
    if not dry:
        if not torch.cuda.is_available():
            sys.exit('torch sees no CUDA device; run with --dry-run to check the script on a CPU')
        if 'CUDAExecutionProvider' not in ort.get_available_providers():
            sys.exit(f'onnxruntime {ort.__version__} has no CUDAExecutionProvider: pip install onnxruntime-gpu')
        # fp32 means fp32 on both sides: no TF32 in PyTorch's convolutions and matmuls either.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device('cpu' if dry else 'cuda')
    provider = 'cpu' if dry else 'cuda'
    sync = None if dry else torch.cuda.synchronize

    results = dict(
        model=model_name, dry_run=dry, batch_sizes=batch_sizes, repeats=repeats,
        env=dict(torch=torch.__version__, onnxruntime=ort.__version__, providers=ort.get_available_providers(),
                 gpu=None if dry else torch.cuda.get_device_name(), cpu=platform.processor() or platform.machine()),
    )
    model = calibrated_model(model_name)
    tmp = Path(tempfile.mkdtemp(prefix='gpu_onnx_bench_'))
    files = {}

    def export_both():
        info = {}
        for precision in ('fp32', 'fp16'):
            report = export_onnx(model, tmp / f'{model_name}_{precision}.onnx', fp16=precision == 'fp16')
            files[precision] = report.path
            info[precision] = dict(probe_max_abs_diff=report.max_abs_diff, size_mb=report.size_bytes / 2 ** 20,
                                   ops=report.op_counts)
        return info
    section(results, 'export', export_both)

    sessions = {}

    def open_sessions():
        info = {}
        for precision, path in files.items():
            sessions[precision] = OnnxClassifier(path, provider)
            info[precision] = dict(providers=sessions[precision].session.get_providers())
            if not dry:
                # Does every node run on the GPU? A strict session fails if ORT would put one on the CPU.
                try:
                    OnnxClassifier(path, provider, strict_cuda=True)
                    info[precision]['all_nodes_on_cuda'] = True
                except Exception as e:  # recorded, not fatal: shape nodes on the CPU are legitimate
                    info[precision]['all_nodes_on_cuda'] = f'no: {type(e).__name__}: {str(e)[:200]}'
        return info
    section(results, 'sessions', open_sessions)

    gpu_model = copy.deepcopy(model).to(device)
    inputs = {bs: torch.randn(bs, 3, 32, 32, generator=torch.Generator().manual_seed(bs)).to(device)
              for bs in batch_sizes}

    def parity():
        out = {}
        for bs, x in inputs.items():
            with torch.inference_mode():
                eager = to_numpy(gpu_model(x))
                cpu_ref = to_numpy(model(x.cpu()))
            o32, o16 = to_numpy(sessions['fp32'](x)), to_numpy(sessions['fp16'](x))
            scale = float(np.abs(cpu_ref).max())
            out[str(bs)] = dict(
                logit_scale=scale,
                ort_fp32_vs_torch_cpu=max_diff(o32, cpu_ref), ort_fp32_vs_eager=max_diff(o32, eager),
                eager_vs_torch_cpu=max_diff(eager, cpu_ref), ort_fp16_vs_fp32=max_diff(o16, o32),
                fp16_top1_agreement=float((o16.argmax(1) == o32.argmax(1)).mean()),
                fp16_finite=bool(np.isfinite(o16).all()))
        return out
    section(results, 'parity', parity)

    def bit_identity():
        # A second session of each file must reproduce the first bit for bit, and so must repeated runs.
        out = {}
        for precision, path in files.items():
            other = OnnxClassifier(path, provider)
            for bs, x in inputs.items():
                a, b, c = (to_numpy(s(x)) for s in (sessions[precision], other, sessions[precision]))
                out[f'{precision}_batch{bs}'] = dict(across_sessions=bool(np.array_equal(a, b)),
                                                     repeated_run=bool(np.array_equal(a, c)))
        return out
    section(results, 'bit_identity', bit_identity)

    def latency():
        out = {}
        compiled = None if dry else torch.compile(gpu_model)
        for bs, x in inputs.items():
            fns = {'ort_fp32': lambda: sessions['fp32'](x), 'ort_fp16': lambda: sessions['fp16'](x),
                   'torch_eager': lambda: gpu_model(x)}
            if compiled is not None:
                start = time.perf_counter()
                with torch.inference_mode():
                    compiled(x)
                out[f'compile_seconds_batch{bs}'] = round(time.perf_counter() - start, 1)
                fns['torch_compile'] = lambda: compiled(x)
            with torch.inference_mode():
                times = time_interleaved(fns, repeats=repeats, warmup=3, sync=sync)
            med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
            out[str(bs)] = dict(median_ms=med, images_per_s={k: bs / (v / 1e3) for k, v in med.items()})
        return out
    section(results, 'latency', latency)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2))
    print(f'wrote {out_path}')
    failed = [k for k, v in results.items() if isinstance(v, dict) and 'error' in v]
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
