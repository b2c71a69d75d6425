"""Data loading: file formats, the decode cache, label order, splits, subsets and batched augmentation."""
import dataclasses
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from sd_zoo import data
from sd_zoo.errors import ConfigError, DataNotFoundError

from conftest import need_data


def _jpeg_bytes(color) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new('RGB', (32, 32), tuple(color)).save(buf, format='JPEG', quality=95)
    return buf.getvalue()


def _write_archive(path: Path, classes, per_class: int = 2, shift: int = 0) -> None:
    """A miniature cifar*-jpeg75.tar.gz: flat-coloured images whose colour encodes (class, index)."""
    with tarfile.open(path, 'w:gz') as tar:
        for split in ('train', 'test'):
            for c, name in enumerate(classes):
                for i in range(per_class):
                    payload = _jpeg_bytes((20 * c + shift, 100 + 50 * i, 200 if split == 'test' else 0))
                    member = tarfile.TarInfo(f'{split}/{name}/{i:04d}.jpg')
                    member.size = len(payload)
                    tar.addfile(member, io.BytesIO(payload))


def _unpublished(monkeypatch, *names):
    """Miniature archives stand in for the published ones: no recorded digest to compare them with."""
    for name in names:
        monkeypatch.setitem(data.DATASETS, name, dataclasses.replace(data.DATASETS[name], sha256=None))


@pytest.fixture
def fake_jpeg_root(tmp_path, monkeypatch):
    monkeypatch.setenv('SD_ZOO_CACHE', str(tmp_path / 'cache'))
    _unpublished(monkeypatch, 'cifar10-jpeg75')
    root = tmp_path / 'data'
    root.mkdir()
    # Given in shuffled order: labels must come from the sorted folder names, not the archive order.
    _write_archive(root / 'cifar10-jpeg75.tar.gz', ['truck', 'airplane', 'cat', 'bird', 'automobile',
                                                    'deer', 'dog', 'frog', 'horse', 'ship'])
    return root


def _real_file(name: str) -> Path:
    """The file of the data set ``name`` in the data folder (see conftest.need_data)."""
    need_data(name)
    return data.data_root() / data.DATASETS[name].source


def test_jpeg_archive_decodes_with_alphabetical_labels(fake_jpeg_root):
    x, y = data.load_split('cifar10-jpeg75', 'train', root=fake_jpeg_root)
    assert x.dtype == np.uint8 and x.shape == (20, 32, 32, 3) and y.dtype == np.int64
    assert y.tolist() == [c for c in range(10) for _ in range(2)]
    # 'airplane' (label 0) was the second folder written, with red channel 20.
    assert abs(int(x[0, 16, 16, 0]) - 20) <= 3 and abs(int(x[1, 16, 16, 1]) - 150) <= 3
    xt, _ = data.load_split('cifar10-jpeg75', 'test', root=fake_jpeg_root)
    assert abs(int(xt[0, 0, 0, 2]) - 200) <= 3


def test_cache_round_trip_skips_decoding(fake_jpeg_root, monkeypatch):
    x1, y1 = data.load_split('cifar10-jpeg75', 'train', root=fake_jpeg_root)
    assert len(list(data.cache_dir().glob('cifar10-jpeg75-*.npz'))) == 1

    def no_decode(*args):
        raise AssertionError('decoded again although the cache matches')
    monkeypatch.setattr(data, '_decode_jpeg_archive', no_decode)
    x2, y2 = data.load_split('cifar10-jpeg75', 'train', root=fake_jpeg_root)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)


def test_cache_is_keyed_by_archive_checksum(fake_jpeg_root):
    archive = fake_jpeg_root / 'cifar10-jpeg75.tar.gz'
    x1, _ = data.load_split('cifar10-jpeg75', 'train', root=fake_jpeg_root)
    _write_archive(archive, sorted(data.CIFAR10_CLASSES), shift=100)
    x2, _ = data.load_split('cifar10-jpeg75', 'train', root=fake_jpeg_root)
    assert abs(int(x2[0, 16, 16, 0]) - 100) <= 3, 'a changed archive must not be served from the old cache'
    assert not np.array_equal(x1, x2)
    assert len(list(data.cache_dir().glob('cifar10-jpeg75-*.npz'))) == 2


def test_corrupt_cache_is_rebuilt(fake_jpeg_root):
    x1, _ = data.load_split('cifar10-jpeg75', 'train', root=fake_jpeg_root)
    (cache,) = data.cache_dir().glob('cifar10-jpeg75-*.npz')
    cache.write_bytes(cache.read_bytes()[:1000])
    x2, _ = data.load_split('cifar10-jpeg75', 'train', root=fake_jpeg_root)
    np.testing.assert_array_equal(x1, x2)
    with np.load(cache) as f:
        assert f['train_x'].shape == x1.shape


def test_corrupt_archive_gives_clear_error(fake_jpeg_root):
    archive = fake_jpeg_root / 'cifar10-jpeg75.tar.gz'
    archive.write_bytes(archive.read_bytes()[:-400])
    with pytest.raises(DataNotFoundError, match='corrupt or truncated'):
        data.load_split('cifar10-jpeg75', 'train', root=fake_jpeg_root)


def test_unpublished_archive_with_a_flipped_bit_is_refused_by_gzips_crc(fake_jpeg_root):
    archive = fake_jpeg_root / 'cifar10-jpeg75.tar.gz'
    blob = bytearray(archive.read_bytes())
    blob[len(blob) // 2] ^= 0x10  # inside the compressed stream, far from the gzip trailer
    archive.write_bytes(bytes(blob))
    with pytest.raises(DataNotFoundError, match='corrupt'):
        data.load_split('cifar10-jpeg75', 'train', root=fake_jpeg_root)
    assert not list(data.cache_dir().glob('*.npz'))


def test_published_archive_with_a_flipped_bit_is_refused_before_decoding(tmp_path, monkeypatch):
    real = _real_file('cifar10-jpeg75')
    monkeypatch.setenv('SD_ZOO_CACHE', str(tmp_path / 'cache'))
    blob = bytearray(real.read_bytes())
    blob[len(blob) // 2] ^= 0x01  # one bit in the middle of the archive
    (tmp_path / real.name).write_bytes(bytes(blob))
    with pytest.raises(DataNotFoundError, match=f'corrupt: its sha256 is [0-9a-f]{{64}}, the published file has '
                                                f'{data.DATASETS["cifar10-jpeg75"].sha256}'):
        data.load_split('cifar10-jpeg75', 'test', root=tmp_path)
    assert not (tmp_path / 'cache').exists()  # nothing decoded, nothing cached


def test_every_published_data_file_matches_its_recorded_digest():
    for name, info in data.DATASETS.items():
        if info.sha256 is not None:
            assert data.sha256_file(_real_file(name)) == info.sha256, name


def test_wrong_class_count_is_rejected(tmp_path, monkeypatch):
    monkeypatch.setenv('SD_ZOO_CACHE', str(tmp_path / 'cache'))
    _unpublished(monkeypatch, 'cifar100-jpeg75')
    _write_archive(tmp_path / 'cifar100-jpeg75.tar.gz', ['a', 'b'])
    with pytest.raises(DataNotFoundError, match='expected 100 class folders'):
        data.load_split('cifar100-jpeg75', 'train', root=tmp_path)


def test_missing_dataset_names_files_and_env_var(tmp_path):
    with pytest.raises(DataNotFoundError) as e:
        data.load_split('cifar10', 'train', root=tmp_path)
    assert 'cifar-10-batches-py' in str(e.value) and 'SD_ZOO_DATA' in str(e.value)
    with pytest.raises(DataNotFoundError, match='cifar100-jpeg75.tar.gz'):
        data.load_split('cifar100-jpeg75', 'test', root=tmp_path)


def test_unknown_dataset_and_split():
    with pytest.raises(ConfigError, match='unknown dataset'):
        data.load_split('mnist', 'train')
    with pytest.raises(ConfigError, match="no 'test' split"):
        data.load_split('cifar10-lossless4000', 'test')


def test_data_root_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv('SD_ZOO_DATA', str(tmp_path))
    assert data.data_root() == tmp_path
    monkeypatch.delenv('SD_ZOO_DATA')
    assert data.data_root().parts[-2:] == ('shared', 'data')


def _write_torchvision_cifar10(folder: Path, n: int = 4) -> np.ndarray:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    chw = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
        with open(folder / name, 'wb') as f:
            pickle.dump({'data': chw.reshape(n, -1), 'labels': list(range(n))}, f, protocol=2)
    return chw


def test_torchvision_pickle_layout(tmp_path):
    chw = _write_torchvision_cifar10(tmp_path / 'cifar-10-batches-py')
    x, y = data.load_split('cifar10', 'train', root=tmp_path)
    assert x.shape == (20, 32, 32, 3) and y.tolist() == list(range(4)) * 5
    np.testing.assert_array_equal(x[:4], chw.transpose(0, 2, 3, 1))
    xt, _ = data.load_split('cifar10', 'test', root=tmp_path)
    assert len(xt) == 4


class _Exploit:
    def __reduce__(self):
        return (os.system, ('echo pwned',))


def test_pickle_reader_refuses_code(tmp_path):
    folder = tmp_path / 'cifar-100-python'
    folder.mkdir()
    with open(folder / 'train', 'wb') as f:
        pickle.dump({'data': _Exploit(), 'fine_labels': [0]}, f)
    with pytest.raises(DataNotFoundError, match='not allowed'):
        data.load_split('cifar100', 'train', root=tmp_path)


def test_real_archives_have_standard_class_order():
    for name, n in (('cifar10-jpeg75', 10), ('cifar100-jpeg75', 100)):
        with tarfile.open(_real_file(name), 'r:gz') as tar:
            folders = sorted({Path(m.name).parts[1] for m in tar if m.isdir() and len(Path(m.name).parts) == 2})
        assert len(folders) == n
        assert tuple(folders) == (data.CIFAR10_CLASSES if n == 10 else data.CIFAR100_CLASSES)


def test_every_dataset_names_its_classes_in_label_order():
    for name, info in data.DATASETS.items():
        assert info.num_classes == len(set(info.classes)) == (100 if name.startswith('cifar100') else 10), name
        assert list(info.classes) == sorted(info.classes), name  # the alphabetical folders are the label order
    assert data.dataset_info('cifar100-jpeg75').classes[:3] == ('apple', 'aquarium_fish', 'baby')


def test_lossless_4000_labels_match_jpeg_images():
    """Image k of class c in the lossless set is JPEG train/<c>/k: checks labels and within-class order."""
    need_data('cifar10-lossless4000', 'cifar10-jpeg75')
    x4, y4 = data.load_split('cifar10-lossless4000', 'train')
    xj, yj = data.load_split('cifar10-jpeg75', 'train')
    assert y4[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    for c in range(10):
        lossless = x4[y4 == c].astype(np.float32)
        jpeg = xj[yj == c][:len(lossless)].astype(np.float32)
        matched = np.abs(lossless - jpeg).mean(axis=(1, 2, 3))
        shifted = np.abs(lossless[1:] - jpeg[:-1]).mean(axis=(1, 2, 3))
        assert matched.max() < 16 and (matched[1:] < shifted).all()


def test_train_val_split():
    train, val = data.train_val_split(50000)
    assert len(train) == 45000 and len(val) == 5000
    assert len(np.intersect1d(train, val)) == 0 and len(np.union1d(train, val)) == 50000
    again_train, again_val = data.train_val_split(50000)
    np.testing.assert_array_equal(val, again_val)
    assert not np.array_equal(val, data.train_val_split(50000, seed=1)[1])
    with pytest.raises(ConfigError):
        data.train_val_split(4000, 5000)


def test_balanced_subset_takes_first_images_per_class():
    labels = np.array([2, 2, 1, 0, 1, 0, 2, 0, 1, 0])
    subset = data.balanced_subset(labels, np.arange(10), 7)
    assert subset.tolist() == [0, 1, 2, 3, 4, 5, 7]  # 3 of class 0, 2 of 1, 2 of 2, earliest first
    assert data.balanced_subset(labels, np.array([2, 5, 9, 1, 4, 3, 6]), 3).tolist() == [1, 2, 5]
    with pytest.raises(ConfigError, match='class 1 has only 3'):
        data.balanced_subset(labels, np.arange(10), 12)
    assert len(data.balanced_subset(labels, np.arange(10), 1)) == 1
    for size in (0, -5, -1):  # -5 once cut each class from its end ([:-1], [:-2]) and kept 5 of the 10
        with pytest.raises(ConfigError, match=f'a class-balanced subset needs a size >= 1, got {size}'):
            data.balanced_subset(labels, np.arange(10), size)


def _images(n=6):
    return torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8)


def test_augment_crop_flip_and_zero_padding():
    x = data.normalize(_images(), data.CIFAR10_MEAN, data.CIFAR10_STD)
    n = len(x)
    center = torch.full((n, 2), data.PAD)
    no_flip, flip = torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)
    assert data.augment(x, center, no_flip).shape == x.shape
    assert torch.equal(data.augment(x, center, no_flip), x)
    assert torch.equal(data.augment(x, center, flip), x.flip(3))
    corner = data.augment(x, torch.zeros(n, 2, dtype=torch.long), no_flip)
    assert (corner[:, :, :4] == 0).all() and (corner[:, :, :, :4] == 0).all()
    assert torch.equal(corner[:, :, 4:, 4:], x[:, :, :28, :28])
    shifted = data.augment(x, torch.tensor([[8, 6]] * n), flip)
    # Rows 4.. and columns 2.. of the image, mirrored; the padding ends up in the first two columns.
    assert torch.equal(shifted[:, :, :28, 2:], x[:, :, 4:, 2:].flip(3))
    assert (shifted[:, :, :, :2] == 0).all() and (shifted[:, :, 28:] == 0).all()


def test_normalize_standardises_channels():
    x = torch.zeros(1, 32, 32, 3, dtype=torch.uint8)
    out = data.normalize(x, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    assert out.shape == (1, 3, 32, 32)
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([-2.0, -1.0, -0.5]))


def test_loader_is_deterministic_per_epoch_and_shards_by_rank():
    images, labels = _images(40), torch.arange(40)
    kw = dict(batch_size=8, mean=data.CIFAR10_MEAN, std=data.CIFAR10_STD, train=True, seed=3)
    loader = data.Loader(images, labels, **kw)
    assert len(loader) == 5
    epoch1 = list(loader.epoch(1))
    assert all(torch.equal(a, b) and torch.equal(ya, yb)
               for (a, ya), (b, yb) in zip(epoch1, data.Loader(images, labels, **kw).epoch(1)))
    assert not torch.equal(epoch1[0][1], next(loader.epoch(2))[1])
    assert sorted(torch.cat([y for _, y in epoch1]).tolist()) == list(range(40))
    shards = [list(data.Loader(images, labels, rank=r, world_size=2, **kw).epoch(1)) for r in range(2)]
    for step, (x, y) in enumerate(epoch1):
        assert torch.equal(torch.cat([shards[0][step][0], shards[1][step][0]]), x)
        assert torch.equal(torch.cat([shards[0][step][1], shards[1][step][1]]), y)


def test_eval_loader_keeps_order_and_last_batch():
    images = _images(10)
    loader = data.Loader(images, torch.arange(10), batch_size=4, mean=(0, 0, 0), std=(1, 1, 1))
    batches = list(loader.epoch())
    assert len(loader) == 3 and [len(y) for _, y in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([x for x, _ in batches]), images.permute(0, 3, 1, 2).float() / 255)
