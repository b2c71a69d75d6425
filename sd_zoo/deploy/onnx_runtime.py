"""Run an exported sd-zoo ONNX classifier with ONNX Runtime, on the CPU or on a CUDA GPU.

:class:`OnnxClassifier` wraps one ``InferenceSession`` and follows the ``logits_fn`` contract of
``sd_zoo.evaluation.evaluate``: call it with uint8 images [N, H, W, C] (normalised here with the mean and std
stored in the file) or with a float NCHW batch that is already normalised; it returns logits. Anything
else (another dtype or layout, a float image left in [0, 255]) is an InputShapeError saying what is expected.

CPU sessions use full graph optimisation, sequential execution and one thread per physical core,
which together make the exported network several times faster than PyTorch eager at batch 1.
CUDA sessions (``onnxruntime-gpu``) bind inputs and outputs on the device and fail loudly when CUDA
cannot be used rather than quietly running on the CPU. :func:`time_interleaved` is the latency
measurement the ONNX benchmarks share.
"""
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from ..errors import ConfigError, ExportError, InputShapeError
from ..files import decode_metadata
from ..models.inputs import NORMALIZED, UINT8_IMAGES, check_normalized_values, check_uint8_images, dtype_name, is_float


PROVIDERS = ('cpu', 'cuda')
_ORT_TYPES = {'tensor(float)': np.float32, 'tensor(float16)': np.float16, 'tensor(double)': np.float64}


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise ConfigError(
            'ONNX Runtime is not installed: pip install "sd-zoo[onnx]" (CPU) or "sd-zoo[gpu]" (CUDA)') from e
    return onnxruntime


def normalize_uint8(images: np.ndarray, mean: Sequence[float], std: Sequence[float],
                    what: str = 'normalize_uint8') -> np.ndarray:
    """uint8 images [N, H, W, C] -> float32 [N, C, H, W] as ``(x / 255 - mean) / std``, the export's input.

    ``what`` names the caller in the error for any other input (an InputShapeError saying what is expected).
    """
    images = np.asarray(images)
    check_uint8_images(images, len(mean), what)
    x = images.astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255)
    x -= np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    x /= np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return np.ascontiguousarray(x)


def physical_cores() -> int:
    """Physical cores this process may run on; hyper-threads share a core's vector units, so count once."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        try:
            cores.add(Path(f'/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list').read_text().strip())
        except OSError:
            return max(1, len(cpus))
    return max(1, len(cores))


class OnnxClassifier:
    """An image classifier exported by ``sd-zoo export``, run by ONNX Runtime.

    Args:
        path: the .onnx file.
        provider: ``'cpu'`` or ``'cuda'`` (needs onnxruntime-gpu; never falls back to the CPU).
        device_id: CUDA device.
        use_tf32: allow TF32 convolutions on Ampere and later GPUs (faster, about 1e-3 relative error);
            off by default so that outputs match float32 PyTorch closely.
        threads: CPU threads for one inference; default one per physical core.
        mean, std: input normalisation for :meth:`predict_uint8`; default the values stored in the file.
        strict_cuda: with CUDA, refuse a graph any of whose nodes ORT would place on the CPU.
        spinning: let idle CPU worker threads busy-wait for the next run (ORT's default); False gives slightly
            slower wake-ups but leaves the cores to other work in the process (PyTorch, in a benchmark).
    """

    def __init__(
            self,
            path: Union[str, os.PathLike],
            provider: str = 'cpu',
            device_id: int = 0,
            use_tf32: bool = False,
            threads: Optional[int] = None,
            mean: Optional[Sequence[float]] = None,
            std: Optional[Sequence[float]] = None,
            strict_cuda: bool = False,
            spinning: bool = True,
    ):
        ort = import_onnxruntime()
        self.path = Path(path)
        if provider not in PROVIDERS:
            raise ConfigError(f'unknown provider {provider!r}; choose one of {PROVIDERS}')
        if not self.path.is_file():
            raise ExportError(f'ONNX file {self.path} does not exist')
        self.provider = provider
        self.device_id = device_id
        # ENABLE_ALL includes the CPU layout pass (blocked NCHWc convolutions with fused Add and ReLU).
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.intra_op_num_threads = threads or physical_cores()
        so.inter_op_num_threads = 1
        # x86 CPUs without VNNI saturate uint8 x int8 products of 8-bit weights: compute those exactly (no effect
        # on fp32 graphs, on sd-zoo's default 7-bit int8 weights, or on CPUs with VNNI).
        so.add_session_config_entry('session.x64quantprecision', '1')
        if not spinning:
            so.add_session_config_entry('session.intra_op.allow_spinning', '0')
        providers: List[Any] = ['CPUExecutionProvider']
        if provider == 'cuda':
            if 'CUDAExecutionProvider' not in ort.get_available_providers():
                raise ConfigError(
                    f'CUDA was requested but this ONNX Runtime ({ort.__version__}, providers: '
                    f'{", ".join(ort.get_available_providers())}) has no CUDAExecutionProvider; '
                    f'install onnxruntime-gpu in place of onnxruntime, or use provider="cpu"')
            # EXHAUSTIVE benchmarks algorithms per session, so two sessions may pick different kernels and
            # disagree in the last bits; the heuristic choice is the same every time.
            providers = [('CUDAExecutionProvider', dict(
                device_id=str(device_id), cudnn_conv_algo_search='HEURISTIC', use_tf32='1' if use_tf32 else '0',
                do_copy_in_default_stream='1'))]
            if strict_cuda:
                # Session creation then fails if any node would be placed on the CPU provider.
                so.add_session_config_entry('session.disable_cpu_ep_fallback', '1')
        try:
            self.session = ort.InferenceSession(str(self.path), so, providers=providers)
        except Exception as e:  # ORT raises its own pybind error types (InvalidProtobuf, Fail, ...)
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f'{self.path} is not an ONNX model that ONNX Runtime can load: {first_line}') from e
        if provider == 'cuda' and self.session.get_providers()[0] != 'CUDAExecutionProvider':
            # ORT only warns when the CUDA provider fails to initialise (missing CUDA or cuDNN libraries).
            raise ConfigError(
                f'CUDA was requested but the session runs on {self.session.get_providers()}; check that the '
                f'CUDA and cuDNN libraries onnxruntime-gpu {ort.__version__} needs are installed')
        self.metadata = decode_metadata(self.session.get_modelmeta().custom_metadata_map)
        mean = mean if mean is not None else self.metadata.get('mean')
        std = std if std is not None else self.metadata.get('std')
        self.mean = None if mean is None else tuple(float(v) for v in mean)
        self.std = None if std is None else tuple(float(v) for v in std)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ExportError(
                f'{self.path} has {len(inputs)} inputs and {len(outputs)} outputs; an image classifier has one '
                f'image input and one logits output')
        inp, out = inputs[0], outputs[0]
        if len(inp.shape) != 4 or inp.type not in _ORT_TYPES:
            raise ExportError(
                f'{self.path}: input {inp.name!r} is {inp.type} of shape {inp.shape}; expected a float image '
                f'batch (N, C, H, W)')
        self.input_name, self.output_name = inp.name, out.name
        # Symbolic dimensions (the dynamic batch axis) come back as strings: None means "any size".
        self.input_shape = tuple(d if isinstance(d, int) else None for d in inp.shape)
        self.input_dtype = _ORT_TYPES[inp.type]
        self.num_classes = out.shape[-1] if out.shape and isinstance(out.shape[-1], int) else None

    def check_input(self, shape: Sequence[int]) -> None:
        """Raise :class:`InputShapeError` for a batch shape (N, C, H, W) this graph cannot take."""
        expected = ['N' if d is None else d for d in self.input_shape]
        if len(shape) != 4 or any(e is not None and e != s for e, s in zip(self.input_shape, shape)):
            hint = ''
            if len(shape) == 3:
                hint = ' (a single image? add a batch dimension)'
            elif len(shape) == 4 and shape[-1] == self.input_shape[1] and shape[1] != self.input_shape[1]:
                hint = ' (channels-last layout? transpose to NCHW, or pass uint8 NHWC images)'
            raise InputShapeError(
                f'{self.path.name} takes input of shape ({", ".join(map(str, expected))}), got {tuple(shape)}{hint}')

    def __call__(self, x) -> Any:
        """Logits of a batch: float NCHW (normalised) or uint8 NHWC images; numpy arrays or torch tensors.

        A float32 CUDA torch tensor given to a CUDA classifier stays on the GPU and the logits come back as
        a CUDA tensor; every other input gives a numpy array.
        """
        if hasattr(x, 'detach'):  # a torch tensor; torch is imported only when one is given
            if (self.provider == 'cuda' and x.is_cuda and x.dtype.is_floating_point
                    and self.input_dtype == np.float32 and self.num_classes is not None):
                return self._run_torch_cuda(x)
            x = x.detach().cpu().numpy()
        x = np.asarray(x)
        if x.dtype == np.uint8:
            return self.predict_uint8(x)
        self._check_float(x)
        return self._run(np.ascontiguousarray(x, dtype=self.input_dtype))

    def _check_float(self, x) -> None:
        """InputShapeError for a batch that is neither uint8 images nor a normalised float NCHW batch."""
        if not is_float(x):
            raise InputShapeError(f'{self.path.name} takes {UINT8_IMAGES} or {NORMALIZED}, got {dtype_name(x)} '
                                  f'of shape {tuple(x.shape)}')
        shape = tuple(x.shape)
        # The layout first, whatever the batch size (a fixed-batch graph runs others in chunks).
        self.check_input((self.input_shape[0] or shape[0],) + shape[1:] if len(shape) == 4 else shape)
        check_normalized_values(x, self.path.name, alternative=', or pass the images as uint8 (N, H, W, C)')

    def predict_uint8(self, images: np.ndarray) -> np.ndarray:
        """Logits of uint8 images [N, H, W, C] (RGB), normalised as ``(x / 255 - mean) / std``."""
        if self.mean is None or self.std is None:
            raise ExportError(
                f'{self.path.name} stores no mean/std (not exported by sd-zoo?); pass mean= and std= to '
                f'OnnxClassifier, or feed it normalised float NCHW batches')
        x = normalize_uint8(images, self.mean, self.std, what=self.path.name)
        return self._run(np.ascontiguousarray(x, dtype=self.input_dtype))

    def _run(self, x: np.ndarray) -> np.ndarray:
        fixed = self.input_shape[0]
        if fixed is not None and x.shape[0] != fixed and x.ndim == 4:
            # A graph exported with a fixed batch runs any batch: in chunks, the last one zero-padded.
            chunks = []
            for start in range(0, x.shape[0], fixed):
                chunk = x[start:start + fixed]
                pad = np.zeros((fixed - len(chunk),) + chunk.shape[1:], dtype=chunk.dtype)
                chunks.append(self._run(np.concatenate([chunk, pad]) if len(pad) else chunk)[:len(chunk)])
            return np.concatenate(chunks) if chunks else np.zeros((0, self.num_classes or 0), np.float32)
        self.check_input(x.shape)
        if self.provider == 'cpu':
            return self.session.run([self.output_name], {self.input_name: x})[0]
        binding = self.session.io_binding()
        ort = import_onnxruntime()
        binding.bind_ortvalue_input(self.input_name, ort.OrtValue.ortvalue_from_numpy(x, 'cuda', self.device_id))
        binding.bind_output(self.output_name, 'cuda', self.device_id)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    def _run_torch_cuda(self, x):
        import torch

        x = x.detach().to(torch.float32).contiguous()
        self._check_float(x)  # reading its peak costs little: ORT waits for the tensor below anyway
        self.check_input(tuple(x.shape))
        out = torch.empty((x.shape[0], self.num_classes), dtype=torch.float32, device=x.device)
        binding = self.session.io_binding()
        dev = x.device.index or 0
        binding.bind_input(self.input_name, 'cuda', dev, np.float32, list(x.shape), x.data_ptr())
        binding.bind_output(self.output_name, 'cuda', dev, np.float32, list(out.shape), out.data_ptr())
        # ORT works on its own CUDA stream: finish what torch queued on the input first.
        torch.cuda.current_stream(x.device).synchronize()
        self.session.run_with_iobinding(binding)
        return out

    def __repr__(self) -> str:
        return (f'OnnxClassifier({self.path.name!r}, provider={self.provider!r}, input={self.input_shape}, '
                f'num_classes={self.num_classes})')


def time_interleaved(
        fns: Dict[str, Callable[[], Any]],
        repeats: int,
        warmup: int = 2,
        sync: Optional[Callable[[], None]] = None,
) -> Dict[str, List[float]]:
    """Seconds per call of each function, timed round-robin so that a load change hits all of them alike.

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each clock read, for asynchronous devices.
    """
    sync = sync or (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return times
