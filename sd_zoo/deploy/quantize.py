"""int8 ONNX models: ONNX Runtime static quantization, calibrated on training images, checked on the test split.

:func:`quantize_int8` turns an fp32 file written by ``sd-zoo export`` into QDQ int8 (QuantizeLinear /
DequantizeLinear pairs that ONNX Runtime fuses into integer kernels): int8 weights with one scale per output
channel, uint8 activations with MinMax ranges from the training part of the paper's 45k/5k split, so neither
the validation nor the test images influence it. Unsigned activations matter on x86: ONNX Runtime's CPU
provider fuses every Conv and Add of a uint8-activation graph into QLinearConv / QLinearAdd, while with int8
activations it left 12 of sd_resnet20's 21 convolutions in float and ran slower than fp32.
:func:`compare_on_test` then scores both graphs on the test split; :meth:`Int8Report.summary` warns, with
the number, when int8 loses more than ``LARGE_DROP`` points.

Weights stay within +-64 by default (``weight_bits=7``, ONNX Runtime's ``reduce_range``): x86 CPUs without VNNI
(AVX2, early AVX-512) add pairs of uint8 x int8 products in 16 bits, which saturate for 8-bit weights and
silently change predictions on such a CPU (ONNX Runtime's ``session.x64quantprecision``, which
:class:`OnnxClassifier` sets, computes them exactly there, but barely faster than fp32); 7-bit weights cannot
saturate and keep int8's speed. ``weight_bits=8`` is for CPUs with VNNI and for ARM.
"""
import logging
import os
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import numpy as np

from ..errors import ConfigError, ExportError
from ..files import atomic_write, decode_metadata, set_onnx_metadata
from .onnx_runtime import OnnxClassifier, import_onnxruntime, normalize_uint8
from .onnx_validate import check_fits_dataset

CALIBRATION_IMAGES = 512
WEIGHT_BITS = (7, 8)
DEFAULT_WEIGHT_BITS = 7  # exact on every x86 CPU (the module's docstring says why)
CALIBRATION_BATCH = 64
# Top-1 error increase (percentage points) above which the export prints a warning.
LARGE_DROP = 1.0


def calibration_images(data_name: Optional[str], num_images: int = CALIBRATION_IMAGES) -> np.ndarray:
    """The first ``num_images`` (class-balanced) uint8 images of the training part of ``data_name``'s train split."""
    from .. import data

    if not data_name:
        raise ConfigError('int8 quantization calibrates on training images: name the data '
                          '(--calibration cifar10-jpeg75, or data= in Python)')
    return data.split_part(data_name, 'train', num_images, what='calibration images')[0]


class ImageCalibrationReader:
    """ONNX Runtime ``CalibrationDataReader``: normalised float32 NCHW batches of uint8 HWC images."""

    def __init__(self, images: np.ndarray, input_name: str, mean, std, batch_size: int = CALIBRATION_BATCH):
        self.batches = [{input_name: normalize_uint8(images[i:i + batch_size], mean, std)}
                        for i in range(0, len(images), batch_size)]
        self.rewind()

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        return next(self.batches_left, None)

    def rewind(self) -> None:
        self.batches_left = iter(self.batches)


def _copy_metadata(fp32_path: Path, int8_path: Path, weight_bits: int, calibration: Dict[str, Any]) -> None:
    """The fp32 file's ``sd_zoo.*`` metadata, with the precision and the calibration recorded."""
    import onnx

    src, dst = onnx.load(str(fp32_path)), onnx.load(str(int8_path))
    meta = decode_metadata({p.key: p.value for p in src.metadata_props})
    meta.update(precision='int8', quantization=dict(
        format='QDQ', weights=f'int8 in a {weight_bits}-bit range, one scale per output channel',
        weight_bits=weight_bits, activations='uint8', calibration='MinMax', **calibration))
    set_onnx_metadata(dst, meta)
    dst.doc_string = src.doc_string + ' (int8)'
    onnx.save(dst, str(int8_path))


@contextmanager
def _quiet_root_logger():
    # Mutes the quantizer's advice to run ONNX Runtime's pre-processing (shape inference and graph optimisation):
    # an sd-zoo export is already shape-inferred with BatchNorm folded; pre-processed, it quantized the same.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def check_weight_bits(weight_bits: int) -> None:
    if weight_bits not in WEIGHT_BITS:
        raise ConfigError(f'int8 weight bits must be 7 (any CPU) or 8 (CPUs with VNNI, ARM), got {weight_bits!r}')


def quantize_int8(fp32_path: Union[str, os.PathLike], output: Union[str, os.PathLike], data: Optional[str],
                  num_images: int = CALIBRATION_IMAGES, images: Optional[np.ndarray] = None,
                  weight_bits: int = DEFAULT_WEIGHT_BITS) -> Path:
    """Write the int8 (QDQ, per-channel) version of an sd-zoo fp32 ONNX file, calibrated on ``data``'s training images.

    ``images`` passes the calibration images if :func:`calibration_images` already read them; ``weight_bits``
    (7 or 8) is the range the int8 weights use (see the module's docstring).
    """
    check_weight_bits(weight_bits)
    import_onnxruntime()  # its install hint, before the quantization tool's bare ImportError
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if images is None:
        images = calibration_images(data, num_images)
    fp32 = OnnxClassifier(fp32_path, threads=1)
    if fp32.mean is None or fp32.std is None or fp32.input_dtype != np.float32:
        raise ExportError(f'{fp32_path} is not an fp32 file written by sd-zoo export (no mean/std, or not float32)')
    reader = ImageCalibrationReader(images, fp32.input_name, fp32.mean, fp32.std)

    def write(tmp: Path) -> None:
        with _quiet_root_logger():
            quantize_static(
                str(fp32_path), str(tmp), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=weight_bits == 7,
                calibrate_method=CalibrationMethod.MinMax)
        _copy_metadata(Path(fp32_path), tmp, weight_bits,
                       dict(data=data, images=int(len(images)), split='train (45k part)'))
        OnnxClassifier(tmp, threads=1)  # ONNX Runtime loads it, or this raises ExportError

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(output, write)


@dataclass
class Int8Report:
    """Test-split scores of an int8 graph next to the fp32 graph it was quantized from."""
    path: str
    data: str
    calibration_images: int
    n: int                    # test images scored
    fp32_top1_err: float      # %
    int8_top1_err: float      # %
    top1_agreement: float     # % of images where both graphs predict the same class
    size_bytes: int
    fp32_size_bytes: int

    @property
    def drop(self) -> float:
        """Top-1 error increase of int8 over fp32, in percentage points."""
        return self.int8_top1_err - self.fp32_top1_err

    def summary(self) -> str:
        text = (f'int8 {self.path} ({self.size_bytes / 2 ** 20:.2f} MiB, '
                f'fp32 {self.fp32_size_bytes / 2 ** 20:.2f} MiB), '
                f'calibrated on {self.calibration_images} {self.data} training images\n'
                f'  test top-1 error: int8 {self.int8_top1_err:.2f}%, fp32 {self.fp32_top1_err:.2f}% '
                f'({self.drop:+.2f} points), same class on {self.top1_agreement:.2f}% of {self.n} images')
        if self.drop > LARGE_DROP:
            text += (f'\n  WARNING: int8 raises the top-1 error by {self.drop:.2f} points (more than {LARGE_DROP:g}); '
                     f'try more --calibration-images, or use the fp32 file')
        return text

    def to_dict(self) -> Dict[str, Any]:
        return dict(asdict(self), drop=self.drop)


def compare_on_test(fp32_path: Union[str, os.PathLike], int8_path: Union[str, os.PathLike], data: str,
                    limit: Optional[int] = None, calibration_images: int = 0) -> Int8Report:
    """Top-1 error of both graphs on ``data``'s test split (``limit`` images, class-balanced, if given)."""
    from ..evaluation.evaluate import load_eval_split

    images, labels = load_eval_split(data, 'test', limit)
    errs, preds = {}, {}
    for key, path in (('fp32', fp32_path), ('int8', int8_path)):
        clf = OnnxClassifier(path, threads=1)
        check_fits_dataset(clf, data, images.shape[1:])
        logits = np.concatenate([clf.predict_uint8(images[i:i + 500]) for i in range(0, len(images), 500)])
        preds[key] = logits.argmax(1)
        errs[key] = 100.0 * float((preds[key] != labels).mean())
    return Int8Report(
        path=str(int8_path), data=data, calibration_images=calibration_images, n=int(len(labels)),
        fp32_top1_err=errs['fp32'], int8_top1_err=errs['int8'],
        top1_agreement=100.0 * float((preds['fp32'] == preds['int8']).mean()),
        size_bytes=Path(int8_path).stat().st_size, fp32_size_bytes=Path(fp32_path).stat().st_size)


def export_int8(export: Callable[[Path], Any], output: Union[str, os.PathLike], data: Optional[str],
                num_images: int = CALIBRATION_IMAGES, fp16: bool = False, limit: Optional[int] = None,
                weight_bits: int = DEFAULT_WEIGHT_BITS):
    """``export(path)`` writes an fp32 file (``sd-zoo export``); quantize it to ``output`` and score both.

    Returns the export's report and the :class:`Int8Report` on ``data``'s test split (``limit`` images,
    class-balanced, if given). The fp32 file is a temporary one; export it separately to keep it.
    """
    if fp16:
        raise ConfigError('--int8 and --fp16 exclude each other: int8 quantizes the fp32 graph; choose one')
    check_weight_bits(weight_bits)
    images = calibration_images(data, num_images)  # missing data fails before the export
    with tempfile.TemporaryDirectory(prefix='sd_zoo_int8_') as tmp:
        fp32_path = Path(tmp) / f'{Path(output).stem}.fp32.onnx'
        report = export(fp32_path)
        # Before anything is written to ``output``: weights of another class count cannot be scored on ``data``.
        check_fits_dataset(OnnxClassifier(fp32_path, threads=1), data, images.shape[1:])
        quantize_int8(fp32_path, output, data, num_images, images, weight_bits)
        result = compare_on_test(fp32_path, output, data, limit, num_images)
    # The export report describes the checked fp32 graph; it now names the file that holds its int8 version.
    report.path, report.precision, report.size_bytes = str(output), 'fp32 -> int8', result.size_bytes
    return report, result
