"""Shared test settings: one intra-op thread, so small-tensor tests are fast and repeatable on 2 cores; and
the one rule for tests that need the real data sets (``data.data_root()``, ../shared/data by default): a
missing file skips them, except with ``CI`` set, where the data is always provided and a skip would hide
every such test; a file whose sha256 is not the published one fails them everywhere.
"""
import functools
import os
from pathlib import Path
from typing import Optional

import pytest
import torch

from sd_zoo import data
from sd_zoo.errors import DataNotFoundError

torch.set_num_threads(1)


@functools.lru_cache(maxsize=None)
def _missing_data(name: str, root: str) -> Optional[str]:
    """Why the data set ``name`` cannot be used from ``root`` (None when it can); raises for a corrupt file."""
    path = Path(root) / data.dataset_info(name).source
    if not path.exists():
        return f'{path} not found (set SD_ZOO_DATA to the folder holding the CIFAR files)'
    if path.is_file():
        data.verify_archive(path, data.dataset_info(name).sha256)
    return None


def have_data(name: str = 'cifar10-jpeg75') -> bool:
    """Whether the data set ``name`` is there, for a test that checks more with it; it must be under CI."""
    try:
        missing = _missing_data(name, str(data.data_root()))
    except DataNotFoundError as e:
        pytest.fail(str(e), pytrace=False)
    if missing and os.environ.get('CI'):
        pytest.fail(f'CI provides the data, but {missing}', pytrace=False)
    return missing is None


def need_data(*names: str) -> None:
    """Skip the calling test or fixture unless each data set of ``names`` (default: the CIFAR-10 JPEG-75
    copy) is there; under CI, fail instead."""
    for name in names or ('cifar10-jpeg75',):
        if not have_data(name):
            pytest.skip(_missing_data(name, str(data.data_root())))
