"""`sd-zoo demo`: load weights (a hub folder, or none with a clear fallback), classify, export to ONNX and
agree with ONNX Runtime, on random inputs, image files, and the CIFAR-10 (JPEG-75 copy) test set."""
import json

import pytest
from huggingface_hub import constants as hf_constants

import sd_zoo  # noqa: F401  (registers the models)
from sd_zoo import cli, data
from sd_zoo.cli import demo
from sd_zoo.weights import pretrained
from sd_zoo.weights.checkpoint import save_weights

from conftest import need_data
from test_hub import build, make_run


@pytest.fixture(scope='module')
def hub_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp('demo')
    return build(make_run(root / 'run'), root / 'hub_configs')


@pytest.fixture
def no_weights_anywhere(tmp_path, monkeypatch):
    """No shipped folder, an empty offline Hugging Face cache: the demo must fall back, not fail."""
    monkeypatch.setattr(pretrained, 'SHIPPED_DIR', tmp_path / 'hub_configs')
    monkeypatch.setattr(hf_constants, 'HF_HUB_CACHE', str(tmp_path / 'hf'))
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', True)


def run_demo(*argv):
    return demo.run_demo(cli.build_parser().parse_args(['demo', '--repeats', '3', *argv]))


def test_demo_falls_back_to_an_untrained_model_and_random_inputs(no_weights_anywhere, monkeypatch, tmp_path,
                                                                  capsys):
    monkeypatch.setenv('SD_ZOO_DATA', str(tmp_path / 'nowhere'))  # no test set either
    result = run_demo('--limit', '10')
    out = capsys.readouterr().out
    default = pretrained.best_published('cifar10-jpeg75')  # the published weights the demo shows by default
    assert f'model: {default}, ' in out and f'NOTE: no pretrained weights for {default}' in out
    assert 'sd-zoo hub seed-cache' in out
    assert 'UNTRAINED' in out and not result['trained']
    assert 'using random images instead' in out and result['n'] == 64
    assert 'pytorch_top1_err' not in result  # no labels, no accuracy
    # Untrained, a 110-layer net's logits are huge (BN has no statistics yet): float32 rounding, relatively small.
    assert result['agreement'] == 100.0 and result['max_rel_diff'] < 1e-4
    assert 'ONNX Runtime' in out and 'ms/image' in out


def test_the_default_weights_are_the_published_ones_of_lowest_error_on_the_data(tmp_path):
    manifest = tmp_path / 'published.json'
    entry = dict(sha256='0' * 64, model_args={}, num_images=10000)
    manifest.write_text(json.dumps({
        'sd_resnet20.c10j75': dict(entry, top1_err=24.55), 'sd_resnet110.c10j75_cd': dict(entry, top1_err=9.8),
        'sd_resnet110.c10j75': dict(entry, top1_err=10.4), 'sd_resnet110.c100j75': dict(entry, top1_err=5.0)}))
    assert pretrained.best_published('cifar10-jpeg75', manifest) == 'sd_resnet110.c10j75_cd'
    assert pretrained.best_published('cifar100-jpeg75', manifest) == 'sd_resnet110.c100j75'
    assert pretrained.best_published('cifar10', manifest) is None  # the lossless data: nothing published
    shipped = pretrained.load_manifest()
    best = pretrained.best_published('cifar10-jpeg75')
    assert shipped[best]['top1_err'] == min(e['top1_err'] for n, e in shipped.items() if '.c10j75' in n)


def _images(folder, colors=((250, 10, 10), (10, 10, 250))):
    from PIL import Image
    paths = []
    for i, color in enumerate(colors):
        path = folder / f'img{i}.png'
        Image.new('RGB', (48, 40), color).save(path)  # not 32x32: the timm transform resizes
        paths.append(str(path))
    return paths


def test_demo_classifies_image_files_with_the_checkouts_hub_folder(hub_folder, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(pretrained, 'SHIPPED_DIR', hub_folder.parent)
    # The demo reads the checkout's folder as it is (timm's local-dir:), leaving the Hugging Face cache alone.
    monkeypatch.setattr(hf_constants, 'HF_HUB_CACHE', str(tmp_path / 'hf'))
    # A test build, not the published weights: the packaged manifest records other bytes for this name.
    monkeypatch.setattr(pretrained, 'MANIFEST_PATH', tmp_path / 'published.json')
    paths = _images(tmp_path)
    result = run_demo(*paths, '--onnx', str(tmp_path / 'demo.onnx'))
    out = capsys.readouterr().out
    assert result['trained'] and result['n'] == 2 and 'of this checkout' in out
    assert result['agreement'] == 100.0 and result['max_abs_diff'] < 1e-3
    assert (tmp_path / 'demo.onnx').stat().st_size > 100_000  # kept where asked
    classes = json.loads((hub_folder / 'config.json').read_text())['label_names']
    for path in paths:
        line = next(line for line in out.splitlines() if line.strip().startswith(path))
        assert any(c in line for c in classes) and '%' in line
    assert not (tmp_path / 'hf').exists()


def test_class_names_come_from_the_weights_never_from_the_class_count(tmp_path):
    fresh = sd_zoo.load_model('sd_resnet20', pretrained=False)
    assert fresh.num_classes == 10 and demo.class_names(fresh) is None  # 10 classes need not be CIFAR-10's
    for data_name in ('cifar100-jpeg75', 'cifar10', None):
        model = sd_zoo.load_model('sd_resnet20', pretrained=False, num_classes=data.num_classes(data_name or 'cifar10'))
        path = save_weights(model, tmp_path / f'{data_name}.safetensors', 'sd_resnet20',
                            **({'data': data_name} if data_name else {}))
        names = demo.class_names(sd_zoo.load_model(path))
        assert names == (list(data.dataset_info(data_name).classes) if data_name else None), data_name


def test_demo_names_the_classes_of_cifar100_weights_on_image_files(tmp_path, capsys):
    model = sd_zoo.load_model('sd_resnet20', pretrained=False, num_classes=100)
    path = save_weights(model, tmp_path / 'c100.safetensors', 'sd_resnet20', data='cifar100-jpeg75')
    images = _images(tmp_path, colors=[(10, 200, 10)])
    result = run_demo(*images, '--weights', str(path))
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.strip().startswith(images[0]))
    shown = [part.rsplit(' ', 1)[0] for part in line.split(': ', 1)[1].split(', ')]
    assert len(shown) == 3 and set(shown) <= set(data.CIFAR100_CLASSES), line
    assert shown[0] == data.CIFAR100_CLASSES[result['predictions'][0]]
    assert 'shown by number' not in out


def test_demo_on_cifar_reports_the_accuracy_of_the_card(hub_folder, capsys):
    need_data()
    from sd_zoo.publishing.model_card import card_metrics, read_card
    result = run_demo('--weights', str(hub_folder), '--limit', '100')
    assert result['model'] == hub_folder.name  # named after the folder given, not after the default model
    assert result['n'] == 100 and 'CIFAR-10 (JPEG-75 copy) test images' in result['inputs']
    assert result['onnxruntime_top1_err'] == pytest.approx(result['pytorch_top1_err'], abs=1.0)
    # the card was measured on the same class-balanced 100 test images
    assert round(result['pytorch_top1_err'], 2) == card_metrics(read_card(hub_folder / 'README.md'))['top1_error']
    assert 'accuracy: PyTorch' in capsys.readouterr().out
