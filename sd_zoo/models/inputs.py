"""The two forms of image batch that sd-zoo's input paths take, checked with messages that say what is expected.

* uint8 images (N, H, W, C), RGB in [0, 255]: sd-zoo normalises them itself (``data.normalize``,
  ``evaluate.model_logits_fn``, ``OnnxClassifier``, int8 calibration);
* float (N, C, H, W), already normalised as ``(x / 255 - mean) / std``: what a model's forward and an
  exported graph compute on.

Arrays and tensors alike (numpy or torch): nothing here imports either.
"""
import math

from ..errors import InputShapeError

UINT8_IMAGES = 'uint8 images (N, H, W, C), RGB in [0, 255]'
NORMALIZED = 'float (N, C, H, W) normalised as (x / 255 - mean) / std'
# Normalised CIFAR, SVHN and ImageNet images lie within about [-2.5, 2.8]; an image left in [0, 255]
# (no division by 255) goes far beyond, unless no pixel in the batch is brighter than this.
NORMALIZED_ABS_MAX = 20.0


def dtype_name(x) -> str:
    """'uint8', 'float32', 'bfloat16', ... of a numpy array or a torch tensor."""
    return str(x.dtype).rpartition('.')[2]


def is_float(x) -> bool:
    return dtype_name(x).startswith(('float', 'bfloat'))


def check_uint8_images(images, channels: int, what: str) -> None:
    """InputShapeError unless ``images`` is a uint8 batch (N, H, W, ``channels``)."""
    shape = tuple(images.shape)
    if dtype_name(images) != 'uint8':
        hint = (f' (a normalised float batch goes to the model or graph itself, as {NORMALIZED})'
                if is_float(images) else '')
        raise InputShapeError(f'{what} takes {UINT8_IMAGES}, got {dtype_name(images)} of shape {shape}{hint}')
    if len(shape) != 4 or shape[-1] != channels:
        hint = ''
        if len(shape) == 3:
            hint = ' (a single image? add a batch dimension)'
        elif len(shape) == 4 and shape[1] == channels:
            hint = ' (channels first? uint8 images are channels-last: transpose to (N, H, W, C))'
        raise InputShapeError(f'{what} takes {UINT8_IMAGES} with C = {channels}, got shape {shape}{hint}')


def check_normalized_values(x, what: str, alternative: str = '') -> None:
    """InputShapeError for a float batch with values no normalised image has (an image left in [0, 255])."""
    if not math.prod(x.shape):
        return
    peak = float(abs(x).max())
    if peak > NORMALIZED_ABS_MAX:
        raise InputShapeError(
            f'{what} takes {NORMALIZED}, within about ±3, but this batch reaches {peak:.4g}: divide images '
            f'in [0, 255] by 255 and normalise them with the mean and std of the weights{alternative}')
