#!/usr/bin/env python3
"""Inference benchmark of an sd-zoo model on a GPU machine: PyTorch on the GPU (eager fp32, eager bf16
channels_last, CUDA-graph replay of both, torch.compile) and ONNX Runtime on the same exported graph (the
CPU on every physical core, and CUDA fp32/fp16 when onnxruntime-gpu is installed), at batch 1 and 256,
with parity and run-to-run bit-identity checks. One command:

    python benchmarks/gpu_onnx_bench.py                 # writes $OUT/gpu_onnx_bench.json (or ./)
    python benchmarks/gpu_onnx_bench.py --checkpoint runs/r110/best.safetensors --time-limit 120
    python benchmarks/gpu_onnx_bench.py --dry-run       # CPU: sd_resnet20, batches 1 and 8, no CUDA parts

What the machine lacks (CUDA, onnxruntime's CUDAExecutionProvider, onnxscript for the dynamo exporter)
is recorded in the JSON and the rest still runs; so is every failing section. The model is the
checkpoint's, or sd_resnet110 at random initialisation with BatchNorm statistics from a few
training-mode batches (so that parity is not checked against identity BatchNorms). fp32 means fp32 on
both sides: TF32 is off in PyTorch and in ORT. Latencies are medians of round-robin repeats after a
warm-up, with the input already on the device (ORT CUDA through IOBinding), synchronised before each
clock read; torch.compile runs last, since it takes the longest, and is skipped when ``--time-limit``
would be exceeded.
"""
import argparse
import copy
import json
import os
import platform
import shutil
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

from sd_zoo import load_model  # noqa: E402
from sd_zoo.deploy.onnx_export import export_onnx  # noqa: E402
from sd_zoo.deploy.onnx_runtime import OnnxClassifier, import_onnxruntime, physical_cores, time_interleaved  # noqa: E402

# Seconds to keep free for torch.compile of two batch sizes on a GPU (half for one), else it is skipped.
COMPILE_NEEDS_S = 50.0


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


def cuda_graph(model: torch.nn.Module, x: torch.Tensor):
    """A replay function of ``model(x)`` captured as one CUDA graph (input and output stay in place)."""
    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):  # cuDNN picks its algorithms before the capture
            model(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_y = model(static_x)
    return lambda: (graph.replay(), static_y)[1]


def medians(times: dict, batch: int) -> dict:
    med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    return dict(median_ms=med, images_per_s={k: batch / (v / 1e3) for k, v in med.items()})


class Report:
    """The JSON being built: each section's result, or its error, or why it was skipped."""

    def __init__(self, time_limit: float, path: Path):
        self.data = {}
        self.start = time.perf_counter()
        self.time_limit, self.path = time_limit, path

    def write(self) -> None:
        """Rewritten after every section, so that a run stopped from outside keeps what it measured."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f'.{self.path.name}.tmp')
        tmp.write_text(json.dumps(self.data, indent=2))
        os.replace(tmp, self.path)

    def left(self) -> float:
        return self.time_limit - (time.perf_counter() - self.start)

    def section(self, name: str, fn, needs_s: float = 0.0) -> None:
        """Run one part of the benchmark; a failure is recorded and the others still run."""
        start = time.perf_counter()
        if self.left() < needs_s:
            self.data[name] = dict(skipped=f'out of time ({self.left():.0f} s left, needs about {needs_s:.0f} s)')
        else:
            try:
                self.data[name] = fn()
            except Exception as e:  # a benchmark records every failure rather than stopping
                self.data[name] = dict(error=f'{type(e).__name__}: {e}', traceback=traceback.format_exc(limit=4))
        self.data[name + '_seconds'] = round(time.perf_counter() - start, 2)
        print(f'{name}: {json.dumps(self.data[name])[:400]}', flush=True)
        self.write()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default=None, help='default sd_resnet110 (sd_resnet20 with --dry-run)')
    p.add_argument('--checkpoint', help='weights to load (a safetensors file written by sd-zoo, or a Hub folder)')
    p.add_argument('--batch-sizes', type=int, nargs='+', default=None, help='default 1 256 (1 8 with --dry-run)')
    p.add_argument('--repeats', type=int, default=None, help='timed rounds per batch size (default 30; 3 dry-run)')
    p.add_argument('--time-limit', type=float, default=600.0, help='seconds; later sections are skipped past it')
    p.add_argument('--output', help='JSON file (default $OUT/gpu_onnx_bench.json, else ./gpu_onnx_bench.json)')
    p.add_argument('--dry-run', action='store_true', help='CPU only, small model, no CUDA and no torch.compile')
    args = p.parse_args(argv)
    dry = args.dry_run
    model_name = args.model or ('sd_resnet20' if dry else 'sd_resnet110')
    batch_sizes = args.batch_sizes or ([1, 8] if dry else [1, 256])
    repeats = args.repeats or (3 if dry else 30)
    out_path = Path(args.output or Path(os.environ.get('OUT', '.')) / 'gpu_onnx_bench.json')

    ort = import_onnxruntime()
    cuda = torch.cuda.is_available() and not dry
    ort_cuda = cuda and 'CUDAExecutionProvider' in ort.get_available_providers()
    if cuda:
        # fp32 means fp32 on both sides: no TF32 in PyTorch's convolutions and matmuls either.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    device = torch.device('cuda' if cuda else 'cpu')
    sync = torch.cuda.synchronize if cuda else None
    missing = {}
    if not cuda:
        missing['cuda'] = 'dry run' if dry else 'torch sees no CUDA device'
    if not ort_cuda:
        missing['ort_cuda'] = (f'onnxruntime {ort.__version__} has no CUDAExecutionProvider (providers: '
                               f'{", ".join(ort.get_available_providers())}); install onnxruntime-gpu for it')

    report = Report(args.time_limit, out_path)
    results = report.data
    results.update(
        model=model_name, checkpoint=args.checkpoint, dry_run=dry, batch_sizes=batch_sizes, repeats=repeats,
        missing=missing,
        env=dict(torch=torch.__version__, onnxruntime=ort.__version__, providers=ort.get_available_providers(),
                 gpu=torch.cuda.get_device_name() if cuda else None,
                 cudnn=torch.backends.cudnn.version() if cuda else None,
                 cpu=platform.processor() or platform.machine(), ort_cpu_threads=physical_cores()),
    )
    for reason in missing.values():
        print(f'note: {reason}', flush=True)
    model = load_model(args.checkpoint) if args.checkpoint else calibrated_model(model_name)
    tmp = Path(tempfile.mkdtemp(prefix='gpu_onnx_bench_'))
    files, sessions = {}, {}

    def export_all():
        info = {}
        for precision in ('fp32', 'fp16') if ort_cuda else ('fp32',):  # fp16 is for GPUs only
            report_ = export_onnx(model, tmp / f'{model_name}_{precision}.onnx', fp16=precision == 'fp16')
            files[precision] = report_.path
            info[precision] = dict(exporter=report_.exporter, probe_max_abs_diff=report_.max_abs_diff,
                                   probe_tolerance=report_.tolerance, probe_logit_scale=report_.logit_scale,
                                   size_mb=report_.size_bytes / 2 ** 20, ops=report_.op_counts)
        return info
    report.section('export', export_all)

    def open_sessions():
        info = {}
        if 'fp32' in files:
            sessions['ort_cpu_fp32'] = OnnxClassifier(files['fp32'], 'cpu')
        if ort_cuda:
            for precision, path in files.items():
                sessions[f'ort_cuda_{precision}'] = OnnxClassifier(path, 'cuda')
                try:  # does every node run on the GPU? A strict session fails if ORT would put one on the CPU
                    OnnxClassifier(path, 'cuda', strict_cuda=True)
                    info[f'ort_cuda_{precision}_all_nodes_on_cuda'] = True
                except Exception as e:  # recorded, not fatal: shape nodes on the CPU are legitimate
                    info[f'ort_cuda_{precision}_all_nodes_on_cuda'] = f'no: {type(e).__name__}: {str(e)[:200]}'
        info.update({name: s.session.get_providers() for name, s in sessions.items()})
        return info
    report.section('sessions', open_sessions)

    fp32 = copy.deepcopy(model).to(device)
    bf16 = copy.deepcopy(model).to(device, dtype=torch.bfloat16, memory_format=torch.channels_last) if cuda else None
    inputs = {bs: torch.randn(bs, 3, 32, 32, generator=torch.Generator().manual_seed(bs)).to(device)
              for bs in batch_sizes}
    inputs_bf16 = {bs: x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last) for bs, x in inputs.items()}

    def parity():
        out = {}
        for bs, x in inputs.items():
            with torch.inference_mode():
                eager = to_numpy(fp32(x))
                cpu_ref = to_numpy(model(x.cpu()))
                row = dict(logit_scale=float(np.abs(cpu_ref).max()), eager_vs_torch_cpu=max_diff(eager, cpu_ref))
                if bf16 is not None:
                    half = to_numpy(bf16(inputs_bf16[bs]))
                    row.update(bf16_vs_fp32=max_diff(half, eager),
                               bf16_top1_agreement=float((half.argmax(1) == eager.argmax(1)).mean()))
            for name, session in sessions.items():
                row[f'{name}_vs_torch_cpu'] = max_diff(to_numpy(session(x)), cpu_ref)
            out[str(bs)] = row
        return out
    report.section('parity', parity)

    def bit_identity():
        # A second session of each file must reproduce the first bit for bit, and so must repeated runs.
        out = {}
        for name, session in sessions.items():
            other = OnnxClassifier(session.path, session.provider)
            for bs, x in inputs.items():
                a, b, c = (to_numpy(s(x)) for s in (session, other, session))
                out[f'{name}_batch{bs}'] = dict(across_sessions=bool(np.array_equal(a, b)),
                                                repeated_run=bool(np.array_equal(a, c)))
        return out
    report.section('bit_identity', bit_identity)

    def torch_latency():
        out = {}
        for bs, x in inputs.items():
            fns = {'torch_eager_fp32': lambda: fp32(x)}
            if cuda:
                xb = inputs_bf16[bs]
                fns.update(torch_eager_bf16_cl=lambda: bf16(xb), torch_cudagraph_fp32=cuda_graph(fp32, x),
                           torch_cudagraph_bf16_cl=cuda_graph(bf16, xb))
            for name, session in sessions.items():
                if name.startswith('ort_cuda'):
                    fns[name] = lambda s=session: s(x)
            with torch.inference_mode():
                out[str(bs)] = medians(time_interleaved(fns, repeats=repeats, warmup=3, sync=sync), bs)
        if not cuda:
            out['skipped'] = {k: missing['cuda'] for k in ('torch_eager_bf16_cl', 'torch_cudagraph_fp32',
                                                           'torch_cudagraph_bf16_cl')}
        return out
    report.section('torch_latency', torch_latency)

    def ort_cpu_latency():
        # Alone, so that ORT's worker threads and PyTorch's do not compete for the cores.
        session = sessions['ort_cpu_fp32']
        out = dict(threads=physical_cores())
        for bs, x in inputs.items():
            xc = x.cpu().numpy()
            out[str(bs)] = medians(time_interleaved({'ort_cpu_fp32': lambda: session(xc)}, repeats=repeats,
                                                    warmup=3), bs)
        return out
    report.section('ort_cpu_latency', ort_cpu_latency)

    def compile_latency():
        if not cuda:
            return dict(skipped=missing['cuda'])
        compiled = torch.compile(fp32, dynamic=False)
        out = {}
        for bs, x in inputs.items():
            if report.left() < COMPILE_NEEDS_S / 2:  # one compilation per batch size
                skipped = out.setdefault('skipped', {})
                skipped[f'torch_compile_fp32 batch {bs}'] = f'out of time ({report.left():.0f} s left)'
                continue
            start = time.perf_counter()
            with torch.inference_mode():
                compiled(x)
                sync()
                out[f'compile_seconds_batch{bs}'] = round(time.perf_counter() - start, 1)
                # Eager again in the same rounds: the in-run reference for the compiled model.
                times = time_interleaved({'torch_compile_fp32': lambda: compiled(x), 'torch_eager_fp32': lambda: fp32(x)},
                                         repeats=repeats, warmup=3, sync=sync)
            out[str(bs)] = medians(times, bs)
        return out
    report.section('compile_latency', compile_latency, needs_s=0.0 if dry else COMPILE_NEEDS_S)

    report.write()
    shutil.rmtree(tmp, ignore_errors=True)
    print(f'wrote {out_path}')
    failed = [k for k, v in results.items() if isinstance(v, dict) and 'error' in v]
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
