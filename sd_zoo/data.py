"""CIFAR data for training and evaluation: find the files, decode them once, split, and augment on the device.

Datasets (:data:`DATASETS`; :func:`load_split` gives uint8 images [N, 32, 32, 3] and int64 labels):

* ``cifar10``, ``cifar100``: the lossless originals in torchvision's layout, the paper's setting;
* ``cifar10-jpeg75``, ``cifar100-jpeg75``: JPEG quality-75 copies (``train|test/<class>/*.jpg`` in a tar.gz).
  JPEG loses information, so quote their accuracies as "CIFAR-10 (JPEG-75 copy)", not as the paper's.
  Decoded once and cached as .npz under ``$SD_ZOO_CACHE`` (default ``~/.cache/sd_zoo``), keyed by sha256;
* ``cifar10-lossless4000``: the first 4,000 lossless CIFAR-10 training images (train split only).

Files are looked up in ``$SD_ZOO_DATA``, by default ``../shared/data`` next to the repository checkout.
Training follows the paper: 45k/5k train/validation split of the training set with a fixed seed,
4-pixel zero padding + random 32x32 crop + horizontal flip, done batched on tensors by :class:`Loader`.
"""
import gzip
import io
import os
import pickle
import sys
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError, DataNotFoundError
from .files import atomic_write, sha256_file
from .models.inputs import check_uint8_images
# The input statistics of each dataset are the models' (what the weights of each tag expect).
from .models.tags import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD


# Label order: the alphabetical class folders of the JPEG copies, which is the originals' order too.
CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')
CIFAR100_CLASSES = (
    'apple', 'aquarium_fish', 'baby', 'bear', 'beaver', 'bed', 'bee', 'beetle', 'bicycle', 'bottle', 'bowl', 'boy',
    'bridge', 'bus', 'butterfly', 'camel', 'can', 'castle', 'caterpillar', 'cattle', 'chair', 'chimpanzee', 'clock',
    'cloud', 'cockroach', 'couch', 'crab', 'crocodile', 'cup', 'dinosaur', 'dolphin', 'elephant', 'flatfish', 'forest',
    'fox', 'girl', 'hamster', 'house', 'kangaroo', 'keyboard', 'lamp', 'lawn_mower', 'leopard', 'lion', 'lizard',
    'lobster', 'man', 'maple_tree', 'motorcycle', 'mountain', 'mouse', 'mushroom', 'oak_tree', 'orange', 'orchid',
    'otter', 'palm_tree', 'pear', 'pickup_truck', 'pine_tree', 'plain', 'plate', 'poppy', 'porcupine', 'possum',
    'rabbit', 'raccoon', 'ray', 'road', 'rocket', 'rose', 'sea', 'seal', 'shark', 'shrew', 'skunk', 'skyscraper',
    'snail', 'snake', 'spider', 'squirrel', 'streetcar', 'sunflower', 'sweet_pepper', 'table', 'tank', 'telephone',
    'television', 'tiger', 'tractor', 'train', 'trout', 'tulip', 'turtle', 'wardrobe', 'whale', 'willow_tree', 'wolf',
    'woman', 'worm')

VAL_SIZE = 5000  # the paper holds out 5,000 training images for validation
SPLIT_SEED = 0   # fixed, so every run (any training seed) validates on the same 5,000 images
PAD = 4


@dataclass(frozen=True)
class DatasetInfo:
    title: str         # how results on it are quoted
    classes: Tuple[str, ...]  # names, in label order
    source: str        # file or folder name under the data root
    kind: str          # 'pickle' (torchvision layout), 'jpeg' (tar.gz of class folders) or 'npz'
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    splits: Tuple[str, ...] = ('train', 'test')
    sha256: Optional[str] = None  # of the file as published (PROVENANCE.md of the data folder)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


DATASETS: Dict[str, DatasetInfo] = {
    'cifar10': DatasetInfo('CIFAR-10', CIFAR10_CLASSES, 'cifar-10-batches-py', 'pickle', CIFAR10_MEAN, CIFAR10_STD),
    'cifar100': DatasetInfo('CIFAR-100', CIFAR100_CLASSES, 'cifar-100-python', 'pickle', CIFAR100_MEAN, CIFAR100_STD),
    'cifar10-jpeg75': DatasetInfo(
        'CIFAR-10 (JPEG-75 copy)', CIFAR10_CLASSES, 'cifar10-jpeg75.tar.gz', 'jpeg', CIFAR10_MEAN, CIFAR10_STD,
        sha256='097287809041e0a666355dfce11470ba1b3f2631fe910d8793c716253f10b297'),
    'cifar100-jpeg75': DatasetInfo(
        'CIFAR-100 (JPEG-75 copy)', CIFAR100_CLASSES, 'cifar100-jpeg75.tar.gz', 'jpeg', CIFAR100_MEAN, CIFAR100_STD,
        sha256='66a619d54ec09607d2de8ffc7ec4e9d9e1d594d5c9d9b58a9c3c40ccb3a3308c'),
    'cifar10-lossless4000': DatasetInfo(
        'CIFAR-10 (first 4,000 lossless training images)', CIFAR10_CLASSES, 'cifar10-train-first4000-lossless.npz',
        'npz', CIFAR10_MEAN, CIFAR10_STD, splits=('train',),
        sha256='5a3a42d44290a419b420982b8bebee85690907a7a4ec2535b9ce037d0c54d8cb'),
}

# Files of torchvision's pickled layout, per split.
_PICKLE_FILES = {
    'cifar-10-batches-py': dict(train=[f'data_batch_{i}' for i in range(1, 6)], test=['test_batch'], labels='labels'),
    'cifar-100-python': dict(train=['train'], test=['test'], labels='fine_labels'),
}


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise ConfigError(f'unknown dataset {name!r}; choose one of {", ".join(DATASETS)}')
    return DATASETS[name]


def num_classes(name: str) -> int:
    return dataset_info(name).num_classes


def data_root() -> Path:
    """``$SD_ZOO_DATA``, else ``../shared/data`` beside the checkout (or beside the working directory)."""
    if os.environ.get('SD_ZOO_DATA'):
        return Path(os.environ['SD_ZOO_DATA']).expanduser()
    checkout = Path(__file__).resolve().parent.parent
    base = checkout if (checkout / 'pyproject.toml').exists() else Path.cwd()
    return base.parent / 'shared' / 'data'


def cache_dir() -> Path:
    return Path(os.environ.get('SD_ZOO_CACHE') or Path.home() / '.cache' / 'sd_zoo').expanduser()


def load_split(name: str, split: str, root: Optional[os.PathLike] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 32, 32, 3] (HWC, RGB) and labels int64 [N] of one split, in dataset order."""
    info = dataset_info(name)
    if split not in info.splits:
        raise ConfigError(f'dataset {name} has no {split!r} split (it has: {", ".join(info.splits)})')
    root = Path(root) if root is not None else data_root()
    path = root / info.source
    if not path.exists():
        raise DataNotFoundError(
            f'dataset {name}: expected {"folder" if info.kind == "pickle" else "file"} {path} '
            f'(not found). Put {info.source} in the data folder or point the environment variable '
            f'SD_ZOO_DATA at the folder holding it (now: {root}).')
    if info.kind == 'pickle':
        x, y = _read_pickle_split(path, split)
    elif info.kind == 'npz':
        verify_archive(path, info.sha256)
        x, y = _read_npz(path)
    else:
        x, y = _cached_jpeg_archive(path, info.num_classes, info.sha256)[split]
    _check_arrays(x, y, info.num_classes, f'{name} {split} ({path})')
    return x, y.astype(np.int64)


def _check_arrays(x: np.ndarray, y: np.ndarray, n_classes: int, what: str) -> None:
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3) or len(y) != len(x):
        raise DataNotFoundError(f'{what}: expected uint8 images [N, 32, 32, 3] with N labels, '
                                f'got {x.dtype} {x.shape} and {len(y)} labels; the files are corrupt')
    if len(y) and (y.min() < 0 or y.max() >= n_classes):
        raise DataNotFoundError(f'{what}: labels outside [0, {n_classes}); the files are corrupt')


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR batch files: numpy array reconstruction and plain data only, nothing executable."""
    _ALLOWED = {
        ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
        ('numpy', 'ndarray'), ('numpy', 'dtype'),
        ('_codecs', 'encode'),  # how Python 3 writes bytes in protocol-2 pickles
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f'{module}.{name} is not allowed in a CIFAR batch file')
        # numpy 2 moved numpy.core to numpy._core; old pickles name the old path.
        return super().find_class(module.replace('numpy.core.', 'numpy._core.'), name)


def _read_pickle_split(folder: Path, split: str) -> Tuple[np.ndarray, np.ndarray]:
    layout = _PICKLE_FILES[folder.name]
    xs, ys = [], []
    for fname in layout[split]:
        path = folder / fname
        try:
            with open(path, 'rb') as f:
                batch = _ArrayUnpickler(f, encoding='latin1').load()
            data, labels = np.asarray(batch['data'], dtype=np.uint8), batch[layout['labels']]
        except FileNotFoundError:
            raise DataNotFoundError(f'{path} is missing; {folder} must hold {", ".join(layout[split])}') from None
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
            raise DataNotFoundError(f'{path} is not a readable CIFAR batch file ({e})') from None
        xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(labels, dtype=np.int64))
    return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys)


def _read_npz(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            return f['x'], f['y']
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
        raise DataNotFoundError(f'{path} is not a readable .npz with arrays x and y ({e})') from None


def verify_archive(path: Path, expected: Optional[str]) -> str:
    """The file's sha256, after checking it against the published digest (or, if none is recorded, that a
    gzip file reads to its end, where gzip checks its CRC); DataNotFoundError for a corrupt file."""
    digest = sha256_file(path)
    if expected is not None and digest != expected:
        raise DataNotFoundError(f'{path} is corrupt: its sha256 is {digest}, the published file has {expected}; '
                                f'copy it again (PROVENANCE.md of the data folder lists the digests)')
    if expected is None and path.name.endswith('.gz'):
        try:
            with gzip.open(path, 'rb') as f:
                while f.read(1 << 20):
                    pass
        except (OSError, EOFError, zlib.error) as e:
            raise DataNotFoundError(f'{path} is corrupt or truncated ({e}); copy it again') from None
    return digest


def _cached_jpeg_archive(archive: Path, n_classes: int, sha256: Optional[str]) -> Dict[str, Tuple[np.ndarray, ...]]:
    """Both splits of a JPEG archive, from the cache when it matches the archive's verified sha256."""
    digest = verify_archive(archive, sha256)
    cache = cache_dir() / f'{archive.name.split(".")[0]}-{digest[:16]}.npz'
    try:
        with np.load(cache, allow_pickle=False) as f:
            if str(f['sha256']) != digest:
                raise ValueError('sha256 mismatch')
            splits = {s: (f[f'{s}_x'], f[f'{s}_y']) for s in ('train', 'test')}
        for x, y in splits.values():
            _check_arrays(x, y, n_classes, f'cache {cache}')
        return splits
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError, DataNotFoundError) as e:
        print(f'sd-zoo: rebuilding unreadable cache {cache} ({e})', file=sys.stderr)
    print(f'sd-zoo: decoding {archive.name} once (cached as {cache})', file=sys.stderr)
    splits = _decode_jpeg_archive(archive, n_classes)
    cache.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f'{s}_{k}': a for s, xy in splits.items() for k, a in zip('xy', xy)}

    def write(tmp: Path) -> None:
        with open(tmp, 'wb') as f:
            np.savez(f, sha256=np.array(digest), **arrays)
    # Atomic, so a concurrent reader (another DDP rank, another run) never sees half a file.
    atomic_write(cache, write)
    return splits


def _decode_jpeg_archive(archive: Path, n_classes: int) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    from PIL import Image, UnidentifiedImageError

    files = {}  # (split, class, file name) -> decoded image
    try:
        with tarfile.open(archive, 'r:gz') as tar:
            for member in tar:
                parts = Path(member.name).parts
                if not member.isfile() or len(parts) != 3 or parts[0] not in ('train', 'test'):
                    continue
                with Image.open(io.BytesIO(tar.extractfile(member).read())) as im:
                    files[parts] = np.asarray(im.convert('RGB'))
    except (tarfile.TarError, EOFError, zlib.error, OSError, UnidentifiedImageError) as e:
        raise DataNotFoundError(f'{archive} is corrupt or truncated ({type(e).__name__}: {e}); '
                                f'copy it again (PROVENANCE.md lists its sha256)') from None
    splits = {}
    for split in ('train', 'test'):
        keys = sorted(k for k in files if k[0] == split)
        # Alphabetical class folders are the standard label order of both datasets.
        classes = sorted({k[1] for k in keys})
        if len(classes) != n_classes:
            raise DataNotFoundError(f'{archive}: expected {n_classes} class folders under {split}/, '
                                    f'found {len(classes)}; is this the right archive?')
        if any(files[k].shape != (32, 32, 3) for k in keys):
            raise DataNotFoundError(f'{archive}: every image must be 32x32 RGB')
        label = {c: i for i, c in enumerate(classes)}
        splits[split] = (np.stack([files[k] for k in keys]), np.array([label[k[1]] for k in keys], np.int64))
    return splits


def train_val_split(n: int, val_size: int = VAL_SIZE, seed: int = SPLIT_SEED) -> Tuple[np.ndarray, np.ndarray]:
    """Sorted indices of the training and validation parts of a training set of n images."""
    if not 0 <= val_size < n:
        raise ConfigError(f'validation size {val_size} must lie in [0, {n}) for a training set of {n} images')
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[val_size:]), np.sort(perm[:val_size])


def split_part(name: str, part: str, size: Optional[int] = None, root: Optional[os.PathLike] = None,
               what: str = 'images') -> Tuple[np.ndarray, np.ndarray]:
    """The training (``'train'``) or held-out validation (``'val'``) part of a dataset's train split (the
    paper's 45k/5k split, :func:`train_val_split`); the first ``size`` of it, class-balanced, if given.
    Never reads the test split."""
    images, labels = load_split(name, 'train', root)
    idx = dict(zip(('train', 'val'), train_val_split(len(labels), VAL_SIZE)))[part]
    if size is not None:
        if not 0 < size <= len(idx):
            kind = 'training' if part == 'train' else 'held-out validation'
            raise ConfigError(f'{what} must lie in [1, {len(idx)}] (the {kind} part of {name}), got {size}')
        idx = balanced_subset(labels, idx, size)
    return images[idx], labels[idx]


def balanced_subset(labels: np.ndarray, indices: np.ndarray, size: int) -> np.ndarray:
    """The first ``size`` of ``indices`` taken class by class: n // C per class, the remainder to the lowest labels."""
    # Refused here, for every caller: a negative size would slice [:-1] per class and keep nearly everything.
    if isinstance(size, bool) or size < 1:
        raise ConfigError(f'a class-balanced subset needs a size >= 1, got {size}')
    n_classes = int(labels.max()) + 1
    per_class, extra = divmod(size, n_classes)
    picked = []
    for c in range(n_classes):
        of_class = indices[labels[indices] == c]
        want = per_class + (c < extra)
        if len(of_class) < want:
            raise ConfigError(f'class-balanced subset of {size}: class {c} has only {len(of_class)} images, '
                              f'{want} needed; ask for fewer')
        picked.append(of_class[:want])
    return np.sort(np.concatenate(picked))


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
              what: str = 'sd_zoo.data.normalize') -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W], scaled to [0, 1] and standardised per channel.

    ``what`` names the caller in the error for any other input (an InputShapeError saying what is expected).
    """
    check_uint8_images(images, len(mean), what)
    x = images.permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return x.sub_(mean).div_(std)


def augment(x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Zero-pad by 4, crop 32x32 at ``offsets`` [B, 2] (row, col in 0..8), mirror where ``flips`` [B].

    Applied after normalisation, so the padding is the mean colour, as in the paper's own CIFAR loader
    (cifar-dataset.lua of the authors' code). One gather for the whole batch, no per-image Python.
    """
    b, c, h, w = x.shape
    padded = F.pad(x, (PAD, PAD, PAD, PAD))
    offsets, flips = offsets.to(x.device), flips.to(x.device)
    rows = offsets[:, :1] + torch.arange(h, device=x.device)  # [B, H]
    cols = offsets[:, 1:] + torch.arange(w, device=x.device)  # [B, W]
    # A mirrored crop reads its columns right to left.
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


class Loader:
    """Batches from a uint8 image set held as one tensor on the device.

    With ``train=True`` each epoch is a fresh shuffle (incomplete last batch dropped) with the paper's
    augmentation; otherwise batches follow dataset order, unaugmented. ``batch_size`` is the global
    batch: under DDP every rank draws the same order and augmentation and keeps its slice ``rank`` of
    ``world_size``, so the run sees the same data whatever the number of processes.
    """

    def __init__(self, images, labels, batch_size: int, mean, std, train: bool = False, seed: int = 0,
                 device='cpu', rank: int = 0, world_size: int = 1, channels_last: bool = False):
        self.images = torch.as_tensor(images).to(device)
        self.labels = torch.as_tensor(labels, dtype=torch.int64).to(device)
        self.batch_size, self.mean, self.std = batch_size, mean, std
        self.train, self.seed, self.rank, self.world_size = train, seed, rank, world_size
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def epoch(self, epoch: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        # One CPU generator per (seed, epoch) for shuffle and augmentation: a resumed run replays the same batches.
        state = np.random.SeedSequence([self.seed, epoch]).generate_state(1, np.uint64)[0]
        gen = torch.Generator().manual_seed(int(state))
        order = torch.randperm(n, generator=gen) if self.train else torch.arange(n)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            keep = torch.arange(len(idx)).tensor_split(self.world_size)[self.rank]
            mine = idx[keep].to(self.images.device)
            x = normalize(self.images[mine], self.mean, self.std)
            if self.train:  # drawn for the global batch, so that every rank's generator stays in step
                offsets = torch.randint(0, 2 * PAD + 1, (len(idx), 2), generator=gen)
                flips = torch.rand(len(idx), generator=gen) < 0.5
                x = augment(x, offsets[keep], flips[keep])
            yield x.contiguous(memory_format=self.memory_format), self.labels[mine]
