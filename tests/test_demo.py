"""`sd-zoo demo`: load weights (a hub folder, or none with a clear fallback), classify, export to ONNX and
agree with ONNX Runtime, on random inputs, image files, and the CIFAR-10 (JPEG-75 copy) test set."""
import json

import pytest
from huggingface_hub import constants as hf_constants

import sd_zoo  # noqa: F401  (registers the models)
from sd_zoo import cli, demo, pretrained

from test_hub import HAVE_DATA, build, make_run


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
    assert 'NOTE: no pretrained weights for sd_resnet20.c10j75' in out and 'sd-zoo hub seed-cache' in out
    assert 'UNTRAINED' in out and not result['trained']
    assert 'using random images instead' in out and result['n'] == 64
    assert 'pytorch_top1_err' not in result  # no labels, no accuracy
    assert result['agreement'] == 100.0 and result['max_abs_diff'] < 1e-3
    assert 'ONNX Runtime' in out and 'ms/image' in out


def test_demo_classifies_image_files_with_the_checkouts_hub_folder(hub_folder, monkeypatch, tmp_path, capsys):
    from PIL import Image
    monkeypatch.setattr(pretrained, 'SHIPPED_DIR', hub_folder.parent)
    # A test build, not the published weights: the packaged manifest records other bytes for this name.
    monkeypatch.setattr(pretrained, 'MANIFEST_PATH', tmp_path / 'published.json')
    paths = []
    for i, color in enumerate([(250, 10, 10), (10, 10, 250)]):
        path = tmp_path / f'img{i}.png'
        Image.new('RGB', (48, 40), color).save(path)  # not 32x32: the timm transform resizes
        paths.append(str(path))
    result = run_demo(*paths, '--onnx', str(tmp_path / 'demo.onnx'))
    out = capsys.readouterr().out
    assert result['trained'] and result['n'] == 2 and 'of this checkout' in out
    assert result['agreement'] == 100.0 and result['max_abs_diff'] < 1e-3
    assert (tmp_path / 'demo.onnx').stat().st_size > 100_000  # kept where asked
    classes = json.loads((hub_folder / 'config.json').read_text())['label_names']
    for path in paths:
        line = next(line for line in out.splitlines() if line.strip().startswith(path))
        assert any(c in line for c in classes) and '%' in line


@pytest.mark.skipif(not HAVE_DATA, reason='needs the CIFAR-10 (JPEG-75 copy) test set')
def test_demo_on_cifar_reports_the_accuracy_of_the_card(hub_folder, capsys):
    from sd_zoo.model_card import card_metrics, read_card
    result = run_demo('--weights', str(hub_folder), '--limit', '100')
    assert result['model'] == hub_folder.name  # named after the folder given, not after the default model
    assert result['n'] == 100 and 'CIFAR-10 (JPEG-75 copy) test images' in result['inputs']
    assert result['onnxruntime_top1_err'] == pytest.approx(result['pytorch_top1_err'], abs=1.0)
    # the card was measured on the same class-balanced 100 test images
    assert round(result['pytorch_top1_err'], 2) == card_metrics(read_card(hub_folder / 'README.md'))['top1_error']
    assert 'accuracy: PyTorch' in capsys.readouterr().out
