"""Weights files, the file helpers and the model loader: metadata, verified bytes, reproducible files, the
legacy reader, atomic writes, and one loader for names, tags, folders and files."""
import hashlib
import json
import os
import struct

import pytest
import timm
import torch

import sd_zoo
from sd_zoo.weights import checkpoint, loader, pretrained
from sd_zoo import files
from sd_zoo.errors import ConfigError, WeightsError

SHIPPED = pretrained.SHIPPED_DIR / 'sd_resnet20.c10j75'


def _model(**kwargs):
    torch.manual_seed(0)
    model = timm.create_model('sd_resnet20', **kwargs)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
    return model.eval()


def _flip(path, offset_from_end=3000):
    raw = bytearray(path.read_bytes())
    raw[-offset_from_end] ^= 0x08
    path.write_bytes(bytes(raw))


def test_weights_round_trip_with_the_settings_they_were_trained_with(tmp_path):
    model = _model(drop_path_rate=0.2, sd_rule='inverted')
    path = checkpoint.save_weights(model, tmp_path / 'w.safetensors', data='cifar10-jpeg75', recipe='paper')
    meta = checkpoint.read_metadata(path)
    assert meta['model'] == 'sd_resnet20' and meta['num_classes'] == 10 and meta['data'] == 'cifar10-jpeg75'
    assert meta['model_args'] == model.sd_config()
    assert meta['tensors_sha256'] == checkpoint.tensors_sha256(model.state_dict())
    loaded = sd_zoo.load_model(path)
    assert loaded.sd_config() == model.sd_config() and not loaded.training
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    # an override of the schedule replaces the stored one whole
    probs = [0.9] * 9
    assert sd_zoo.load_model(path, sd_probs=probs).survival_probs == probs
    assert loader.merge_model_args(dict(drop_path_rate=0.2, sd_schedule='linear', sd_gate='batch'),
                                   dict(sd_probs=probs)) == dict(sd_probs=probs, sd_gate='batch')


def test_the_same_tensors_always_give_the_same_bytes(tmp_path):
    model = _model()
    digests = set()
    for i in range(3):
        path = checkpoint.save_weights(model, tmp_path / f'w{i}.safetensors', data='cifar10-jpeg75', tag='c10j75',
                                       recipe='paper')
        digests.add(files.sha256_file(path))
    assert len(digests) == 1
    raw = (tmp_path / 'w0.safetensors').read_bytes()
    (n,) = struct.unpack('<Q', raw[:8])
    header = json.loads(raw[8:8 + n])
    assert list(header) == sorted(header) and list(header['__metadata__']) == sorted(header['__metadata__'])
    assert (8 + n) % 8 == 0  # tensor data stays aligned


def test_a_flipped_bit_in_the_tensor_data_is_refused(tmp_path):
    path = checkpoint.save_weights(_model(), tmp_path / 'w.safetensors')
    _flip(path)
    assert checkpoint.read_metadata(path)['model'] == 'sd_resnet20'  # the header still reads
    with pytest.raises(WeightsError, match=rf'{path} is corrupt: its tensors digest to [0-9a-f]{{64}}, but the '
                                           rf'file records [0-9a-f]{{64}}'):
        sd_zoo.load_model(path)


def test_a_recorded_file_digest_is_checked(tmp_path):
    path = checkpoint.save_weights(_model(), tmp_path / 'w.safetensors')
    good = files.sha256_file(path)
    assert checkpoint.load_state_dict(path, sha256=good).keys() == _model().state_dict().keys()
    with pytest.raises(WeightsError, match=f'its sha256 is {good}, but {"0" * 64} was recorded'):
        checkpoint.load_state_dict(path, sha256='0' * 64)


def test_shipped_weights_are_checked_against_the_manifest(tmp_path, monkeypatch):
    folder = tmp_path / 'hub_configs' / SHIPPED.name
    folder.mkdir(parents=True)
    for f in SHIPPED.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    monkeypatch.setattr(pretrained, 'SHIPPED_DIR', folder.parent)
    # The record is the digest of the shipped bytes, computed here, and it is what a load checks against.
    recorded = pretrained.load_manifest()[SHIPPED.name]['sha256']
    assert hashlib.sha256((SHIPPED / 'model.safetensors').read_bytes()).hexdigest() == recorded
    assert pretrained.shipped_sha256(folder / 'model.safetensors') == recorded
    assert pretrained.shipped_sha256(tmp_path / 'model.safetensors') is None  # outside hub_configs/: no record
    sd_zoo.load_model(SHIPPED.name)  # the recorded bytes load
    _flip(folder / 'model.safetensors')  # a file without a tensors digest: the manifest catches it
    with pytest.raises(WeightsError, match='is corrupt: its sha256 is'):
        sd_zoo.load_model(SHIPPED.name)


def test_pickle_files_are_refused_everywhere(tmp_path):
    pth = tmp_path / 'w.pth'
    pth.write_bytes(b'\x80\x04not really a pickle')
    for load in (checkpoint.read_metadata, checkpoint.load_state_dict, sd_zoo.load_model):
        with pytest.raises(WeightsError, match='pickle-based checkpoint; sd-zoo loads weights from safetensors only'):
            load(pth)


def test_files_written_with_the_old_metadata_keys_still_load(tmp_path):
    from safetensors.torch import save_file

    model = _model(drop_path_rate=0.3, sd_schedule='uniform')
    legacy = {'format': 'pt', 'sd_zoo.model': 'sd_resnet20', 'sd_zoo.num_classes': '10', 'sd_zoo.in_chans': '3',
              'sd_zoo.data': 'cifar10-jpeg75',
              'sd_zoo.sd_config': json.dumps(dict(schedule='uniform', drop_path_rate=0.3, gate='batch', rule='paper',
                                                  survival_probs=model.survival_probs))}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / 'old.safetensors'), legacy)
    loaded = sd_zoo.load_model(tmp_path / 'old.safetensors')
    assert loaded.sd_config() == model.sd_config() and loaded.survival_probs == model.survival_probs
    explicit = files.legacy_model_args(dict(schedule='explicit', drop_path_rate=0.5, gate='sample', rule='inverted',
                                            survival_probs=[1.0, 0.5]))
    assert explicit == dict(sd_probs=[1.0, 0.5], sd_gate='sample', sd_rule='inverted')
    with pytest.raises(ConfigError, match='unreadable stochastic-depth settings'):
        files.legacy_model_args(dict(schedule='linear'))


def test_atomic_write_keeps_the_old_file_when_writing_fails_and_honours_the_umask(tmp_path):
    target = tmp_path / 'f.txt'
    files.atomic_write_text(target, 'old')

    def broken(tmp):
        tmp.write_text('half')
        raise OSError('disk full')
    with pytest.raises(OSError):
        files.atomic_write(target, broken)
    assert target.read_text() == 'old' and [p.name for p in tmp_path.iterdir()] == ['f.txt']
    old = os.umask(0o027)
    try:
        files.atomic_write_text(target, 'new')
        assert target.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
    (tmp_path / '.best.safetensors.123.tmp').write_bytes(b'x')  # left by a killed writer
    assert files.remove_stale_temps(tmp_path) == 1 and [p.name for p in tmp_path.iterdir()] == ['f.txt']


def test_load_model_accepts_names_tags_folders_and_files():
    fresh = sd_zoo.load_model('sd_resnet20', pretrained=False, drop_path_rate=0.0)
    assert fresh.expected_depth == fresh.num_blocks and not fresh.training
    by_tag = sd_zoo.load_model('sd_resnet20.c10j75')
    by_folder = sd_zoo.load_model(SHIPPED)
    by_file = sd_zoo.load_model(SHIPPED / 'model.safetensors')
    x = torch.randn(2, 3, 32, 32)
    ref = by_tag(x)
    for model in (by_folder, by_file):
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
        assert tuple(model.pretrained_cfg['mean']) == tuple(by_tag.pretrained_cfg['mean']) == sd_zoo.data.CIFAR10_MEAN
    with pytest.raises(ConfigError, match="unknown model 'sd_nope'"):
        sd_zoo.load_model('sd_nope')
    with pytest.raises(WeightsError, match='is not a Hub folder: it has no config.json'):
        sd_zoo.load_model(SHIPPED.parent)


def test_the_manifest_records_what_was_built_and_never_builds_models():
    manifest = pretrained.load_manifest()
    for name, entry in manifest.items():
        assert entry['sha256'] == hashlib.sha256((pretrained.SHIPPED_DIR / name / 'model.safetensors')
                                                 .read_bytes()).hexdigest()
        assert entry['model_args'] == timm.create_model(name).sd_config()  # what the tag means, built without it
        assert 0 < entry['top1_err'] < 100


def test_train_hints_only_for_data_the_trainer_has():
    assert 'sd-zoo train --model sd_resnet110 --data cifar100-jpeg75' in pretrained.train_hint('sd_resnet110.c100j75')
    assert pretrained.train_hint('sd_resnet152.in1k') == '' and pretrained.train_hint('sd_svhn_resnet152.svhn') == ''
