"""int8 export: calibration on training images only, a QDQ graph with per-channel weights that ONNX Runtime
loads and that scores within a stated tolerance of fp32 on real test images, combined with pruning,
the accuracy report, and user errors."""
import json
import sys
from functools import partial

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from sd_zoo import data
from sd_zoo.cli import main
from sd_zoo.errors import ConfigError
from sd_zoo.deploy.onnx_export import export_onnx, op_histogram
from sd_zoo.deploy.onnx_runtime import OnnxClassifier
from sd_zoo.deploy.quantize import LARGE_DROP, Int8Report, calibration_images, export_int8, quantize_int8

from conftest import need_data

# int8 against fp32 on 300 real test images: at most this many points of top-1 error apart, and at least
# this share of identical predictions (measured: +0.01 points, 97.9 % on the full test set).
INT8_MAX_DROP = 2.0
INT8_MIN_AGREEMENT = 93.0


@pytest.fixture(scope='module')
def real_data():
    """CIFAR-10 (JPEG-75 copy), each split read once for the module (reading verifies the archive's sha256)."""
    loaded = {}
    real = data.load_split

    def cached(name, split, root=None):
        if (name, split) not in loaded:
            loaded[name, split] = real(name, split, root)
        return loaded[name, split]
    need_data('cifar10-jpeg75')
    cached('cifar10-jpeg75', 'train')
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, 'load_split', cached)
        yield cached


def test_calibration_reads_training_images_only(monkeypatch):
    reads = []

    def fake(name, split, root=None):
        reads.append(split)
        n = 5200
        x = np.zeros((n, 32, 32, 3), np.uint8)
        x[:, 0, 0, 0], x[:, 0, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
        return x, (np.arange(n) % 10).astype(np.int64)
    monkeypatch.setattr(data, 'load_split', fake)
    images = calibration_images('cifar10', 100)
    ids = images[:, 0, 0, 0].astype(int) + 256 * images[:, 0, 0, 1].astype(int)
    train, val = data.train_val_split(5200)
    assert reads == ['train'] and len(set(ids)) == 100
    assert set(ids) <= set(train) and not set(ids) & set(val)


def test_pruned_int8_graph_loads_and_scores_close_to_fp32(tmp_path, real_data):
    out = tmp_path / 'p5_int8.onnx'
    export = partial(export_onnx, 'sd_resnet20.c10j75', pretrained=True, keep_blocks=5)
    report, int8 = export_int8(export, out, 'cifar10-jpeg75', num_images=128, limit=300)
    proto = onnx.load(str(out))
    ops = op_histogram(proto)
    # The pruned net's 13 convolutions (21 - 2 x 4), each fed by quantized activations and weights.
    assert ops['Conv'] == 13 and ops['QuantizeLinear'] >= 13 and ops['DequantizeLinear'] >= 2 * 13
    assert report.op_counts['Conv'] == 13
    conv_weights, conv_weight_scales = _conv_int8_weights_and_scales(proto)
    assert len(conv_weight_scales) == 13
    assert all(s.ndim == 1 and len(s) > 1 for s in conv_weight_scales)  # one scale per output channel
    # 7-bit weights by default, |w| <= 64: x86 CPUs without VNNI add two uint8 x int8 products in 16 bits, and
    # 2 x 255 x 64 < 2 ** 15 cannot saturate.
    assert all(w.dtype == np.int8 for w in conv_weights)
    assert max(np.abs(w.astype(int)).max() for w in conv_weights) == 64  # the range is used, not exceeded
    clf = OnnxClassifier(out, threads=1)
    assert clf.metadata['precision'] == 'int8' and clf.metadata['quantization']['weight_bits'] == 7
    assert clf.metadata['model_args']['sd_keep_blocks'] == [0, 1, 2, 3, 6]
    assert clf.metadata['quantization']['images'] == 128
    # Independently of the report: int8 logits against the fp32 graph on real test images.
    assert int8.n == 300 and int8.calibration_images == 128
    assert abs(int8.drop) <= INT8_MAX_DROP and int8.top1_agreement >= INT8_MIN_AGREEMENT
    images, labels = data.load_split('cifar10-jpeg75', 'test')
    pick = data.balanced_subset(labels, np.arange(len(labels)), 300)
    err = 100 * float((clf.predict_uint8(images[pick]).argmax(1) != labels[pick]).mean())
    assert err == pytest.approx(int8.int8_top1_err)


def _conv_int8_weights_and_scales(proto):
    """The int8 weight tensors that feed the convolutions of a QDQ graph, and their scales."""
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    dequantized = [n for n in proto.graph.node if n.op_type == 'DequantizeLinear'
                   and weights.get(n.input[0]) is not None and weights[n.input[0]].ndim == 4]
    return [weights[n.input[0]] for n in dequantized], [weights[n.input[1]] for n in dequantized]


def test_8bit_weights_use_the_full_range_and_score_close_to_fp32_on_any_cpu(tmp_path, real_data):
    """8-bit weights saturate uint8 x int8 products on x86 CPUs without VNNI (there, without OnnxClassifier's
    session option, this test fails); OnnxClassifier's session computes them exactly, so the scores hold on any
    CPU."""
    out = tmp_path / 'full_int8_w8.onnx'
    export = partial(export_onnx, 'sd_resnet20.c10j75', pretrained=True)
    _, int8 = export_int8(export, out, 'cifar10-jpeg75', num_images=128, limit=300, weight_bits=8)
    conv_weights, _ = _conv_int8_weights_and_scales(onnx.load(str(out)))
    assert len(conv_weights) == 21 and max(np.abs(w.astype(int)).max() for w in conv_weights) == 127
    clf = OnnxClassifier(out, threads=1)
    assert clf.metadata['quantization']['weight_bits'] == 8
    assert abs(int8.drop) <= INT8_MAX_DROP and int8.top1_agreement >= INT8_MIN_AGREEMENT
    assert clf.session.get_session_options().get_session_config_entry('session.x64quantprecision') == '1'
    with pytest.raises(ConfigError, match='int8 weight bits must be 7 .* or 8'):
        export_int8(export, tmp_path / 'w6.onnx', 'cifar10-jpeg75', weight_bits=6)
    assert not (tmp_path / 'w6.onnx').exists()


def test_large_drop_is_printed_with_its_number():
    small = Int8Report('m.onnx', 'cifar10', 512, 1000, 10.0, 10.4, 98.0, 100, 400)
    large = Int8Report('m.onnx', 'cifar10', 512, 1000, 10.0, 14.5, 80.0, 100, 400)
    assert large.drop == pytest.approx(4.5) and LARGE_DROP < 4.5
    assert 'WARNING' not in small.summary() and '+0.40 points' in small.summary()
    assert 'WARNING: int8 raises the top-1 error by 4.50 points' in large.summary()


@pytest.mark.parametrize('extra,message', [
    ([], 'int8 quantization calibrates on training images: name the data'),
    (['--calibration', 'cifar10-jpeg75', '--fp16'], '--int8 and --fp16 exclude each other'),
    (['--calibration', 'cifar10-jpeg75', '--calibration-images', '45001'], 'calibration images must lie in [1, 45000]'),
])
def test_int8_bad_input(tmp_path, capsys, real_data, extra, message):
    out = tmp_path / 'q.onnx'
    assert main(['export', '--model', 'sd_resnet20', '-o', str(out), '--int8'] + extra) == 2
    err = capsys.readouterr().err
    assert message in err and 'Traceback' not in err
    assert not out.exists()


def test_int8_refuses_weights_of_another_class_count_before_writing(tmp_path, capsys, real_data):
    import sd_zoo
    from sd_zoo.weights.checkpoint import save_weights

    weights = save_weights(sd_zoo.load_model('sd_resnet20', pretrained=False, num_classes=100),
                           tmp_path / 'c100.safetensors', 'sd_resnet20', data='cifar100-jpeg75')
    out = tmp_path / 'q.onnx'
    assert main(['export', '--checkpoint', str(weights), '-o', str(out), '--int8', '--calibration', 'cifar10-jpeg75',
                 '--calibration-images', '64']) == 2
    err = capsys.readouterr().err
    assert 'does not fit cifar10-jpeg75: it has 100 outputs, cifar10-jpeg75 has 10 classes' in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_int8_json_report(tmp_path, capsys, monkeypatch, real_data):
    """The CLI prints the int8 scores (full test split; here the split is cut to 200 images) as JSON."""
    real = data.load_split

    def small_test_split(name, split, root=None):
        x, y = real(name, split, root)
        if split == 'test':
            pick = data.balanced_subset(y, np.arange(len(y)), 200)
            x, y = x[pick], y[pick]
        return x, y
    monkeypatch.setattr(data, 'load_split', small_test_split)
    out = tmp_path / 'q.onnx'
    assert main(['export', '--model', 'sd_resnet20.c10j75', '--pretrained', '-o', str(out), '--int8',
                 '--calibration', 'cifar10-jpeg75', '--calibration-images', '64', '--json']) == 0
    printed = capsys.readouterr().out
    report = json.loads(printed.strip().splitlines()[-1])
    assert report['precision'] == 'fp32 -> int8' and report['path'] == str(out)
    assert report['int8']['n'] == 200 and abs(report['int8']['drop']) <= INT8_MAX_DROP
    assert f'int8 {report["int8"]["int8_top1_err"]:.2f}%' in printed


def test_quantize_without_onnxruntime_names_the_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, 'onnxruntime', None)  # what `import onnxruntime` meets when it is absent
    with pytest.raises(ConfigError, match=r'ONNX Runtime is not installed: pip install "sd-zoo\[onnx\]"'):
        quantize_int8(tmp_path / 'model.onnx', tmp_path / 'int8.onnx', 'cifar10', images=np.zeros((1, 32, 32, 3)))
