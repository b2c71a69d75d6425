"""Exceptions that carry a message meant for users: what went wrong and how to fix it.

The ``sd-zoo`` command prints these without a traceback; library users can catch
:class:`SDZooError` or the built-in base each one also derives from.
"""


class SDZooError(Exception):
    """Base class of every error sd-zoo raises on purpose."""


class ConfigError(SDZooError, ValueError):
    """An argument or setting is out of range or inconsistent."""


class InputShapeError(SDZooError, ValueError):
    """An input batch has the wrong shape, dtype or value range for what takes it (see ``sd_zoo.models.inputs``)."""


class DataNotFoundError(SDZooError, FileNotFoundError):
    """A dataset's files are missing or unreadable."""


class WeightsError(SDZooError, RuntimeError):
    """Weights are missing, corrupt, unpublished, or do not fit the architecture."""


class ExportError(SDZooError, RuntimeError):
    """An ONNX export or an ONNX file failed a check."""
