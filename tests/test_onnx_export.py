"""ONNX export of the expected-value network: exact folding of the survival probabilities, a graph with
the operators of a plain ResNet and nothing random, parity with PyTorch on random and CIFAR inputs,
dynamic batch, bit-identical sessions, fp16, metadata, user-facing errors and the CLI."""
import json
import warnings

import numpy as np
import onnx
from sd_zoo.files import new_file_mode, sha256_file
import pytest
import torch
from onnx import TensorProto, helper

import sd_zoo  # noqa: F401  (registers the models)
import timm
from sd_zoo import data
from sd_zoo.weights import pretrained
from sd_zoo.weights.checkpoint import save_weights
from sd_zoo.cli import main
from sd_zoo.errors import ConfigError, ExportError, InputShapeError, WeightsError
from sd_zoo.deploy.onnx_export import (
    MIN_OPSET, RANDOM_OPS, check_no_random_ops, expected_value_model, export_onnx, fold_survival_probs,
    op_histogram, shortcuts_as_convs
)
from sd_zoo.deploy.onnx_runtime import OnnxClassifier, normalize_uint8
from sd_zoo.deploy.onnx_validate import check_fits_dataset, validate_onnx

from conftest import need_data


def randomize_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, as trained weights have."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(0.3 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
    return model


def sd_model(name='sd_resnet20', seed=0, **kwargs):
    torch.manual_seed(seed)
    return randomize_norms(timm.create_model(name, **kwargs), seed)


def within_tol(out, ref, rtol=1e-4):
    return float(np.abs(out - ref).max()) <= rtol * max(1.0, float(np.abs(ref).max()))


def torch_logits(model, x):
    with torch.no_grad():
        return model.eval()(torch.as_tensor(x)).numpy()


@pytest.fixture(scope='module')
def cifar():
    """The first 500 CIFAR-10 (JPEG-75) test images, or a skip when the data is absent."""
    need_data('cifar10-jpeg75')
    x, y = data.load_split('cifar10-jpeg75', 'test')
    return x[:500], y[:500]


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    """sd_resnet20 (paper rule, p_L = 0.5, random BatchNorms) exported from training mode, plus its twin
    with constant depth exported the same way."""
    tmp = tmp_path_factory.mktemp('onnx')
    model = sd_model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probs = list(model.survival_probs)
    report = export_onnx(model, tmp / 'sd.onnx')
    plain = export_onnx(sd_model(drop_path_rate=0.0), tmp / 'plain.onnx')
    return dict(model=model, before=before, probs=probs, report=report, path=tmp / 'sd.onnx',
                plain=plain, tmp=tmp)


# --- Folding ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('rule', ['paper', 'inverted'])
def test_folding_is_exact(rule):
    model = sd_model(sd_rule=rule).eval()
    x = torch.randn(8, 3, 32, 32)
    folded = expected_value_model(model)
    assert all(p == 1.0 for p in folded.survival_probs)
    ref, out = torch_logits(model, x), torch_logits(folded, x)
    assert within_tol(out, ref, 1e-5), np.abs(out - ref).max()
    block, folded_block = model.layer3[-1], folded.layer3[-1]
    p = block.stochastic_depth.survival_prob
    scale = p if rule == 'paper' else 1.0
    torch.testing.assert_close(folded_block.bn2.weight, block.bn2.weight * scale)
    torch.testing.assert_close(folded_block.bn2.bias, block.bn2.bias * scale)


def test_transition_shortcuts_as_convs_are_exact():
    model = sd_model().eval()
    x = torch.randn(4, 3, 32, 32)
    ref = torch_logits(model, x)
    converted = expected_value_model(model)
    assert shortcuts_as_convs(converted) == 2
    assert isinstance(converted.layer2[0].shortcut, torch.nn.Conv2d)
    assert within_tol(torch_logits(converted, x), ref, 1e-5)


def test_unfoldable_block_keeps_its_multiplication():
    model = sd_model().eval()
    # Something after the last norm (here a tanh): p_l no longer passes through to the norm's affine.
    model.layer1[0].bn2 = torch.nn.Sequential(model.layer1[0].bn2, torch.nn.Tanh())
    x = torch.randn(4, 3, 32, 32)
    ref = torch_logits(model, x)
    with pytest.warns(UserWarning, match='keep a Mul'):
        folded = expected_value_model(model)
    assert folded.layer1[0].stochastic_depth.survival_prob == model.layer1[0].stochastic_depth.survival_prob
    assert within_tol(torch_logits(folded, x), ref, 1e-5)
    n, kept = fold_survival_probs(sd_model().eval())
    assert n == 9 and kept == []


def test_user_model_unchanged(exported):
    model = exported['model']
    assert model.training
    assert model.survival_probs == exported['probs']
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in exported['before'].items())


# --- Graph -------------------------------------------------------------------------------------------

def test_graph_is_a_plain_resnet(exported):
    ops, plain_ops = exported['report'].op_counts, exported['plain'].op_counts
    assert ops == plain_ops
    assert ops == op_histogram(onnx.load(exported['path']))
    assert 'Mul' not in ops and not set(ops) & RANDOM_OPS
    assert exported['report'].folded_blocks == 9 and exported['plain'].folded_blocks == 0


def test_inverted_rule_exports_identity_gates(tmp_path, exported):
    model = sd_model(sd_rule='inverted')
    report = export_onnx(model, tmp_path / 'inv.onnx')
    assert report.op_counts == exported['plain'].op_counts
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32), dtype=np.float32)
    assert within_tol(OnnxClassifier(tmp_path / 'inv.onnx')(x), torch_logits(model, x))


def _graph_with(op_type, **attrs):
    node = helper.make_node(op_type, ['x'], ['y'], **attrs)
    graph = helper.make_graph([node], 'g', [helper.make_tensor_value_info('x', TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info('y', TensorProto.FLOAT, [1, 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid('', 18)])


@pytest.mark.parametrize('op', ['RandomUniformLike', 'Dropout', 'Bernoulli'])
def test_random_op_guard_fires(op):
    with pytest.raises(ExportError, match=op):
        check_no_random_ops(_graph_with(op))
    # ... also when the operator hides in a subgraph
    then = helper.make_graph([helper.make_node(op, ['x'], ['y'])], 'then', [],
                             [helper.make_tensor_value_info('y', TensorProto.FLOAT, [1, 4])])
    outer = _graph_with('If', then_branch=then, else_branch=then)
    with pytest.raises(ExportError, match=op):
        check_no_random_ops(outer)
    check_no_random_ops(_graph_with('Relu'))


def test_metadata_and_single_file(exported):
    path = exported['path']
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(path, load_external_data=False)
    assert all(t.data_location == TensorProto.DEFAULT for t in proto.graph.initializer)
    assert not [p.name for p in exported['tmp'].iterdir() if p.is_file() and p.suffix != '.onnx']  # no .data
    assert path.stat().st_mode & 0o777 == new_file_mode()  # shared like any new file, not owner-only
    clf = OnnxClassifier(path)
    meta = clf.metadata
    assert meta['model'] == 'sd_resnet20' and meta['num_classes'] == 10 and meta['precision'] == 'fp32'
    assert clf.mean == pytest.approx(data.CIFAR10_MEAN) and clf.std == pytest.approx(data.CIFAR10_STD)
    assert meta['model_args'] == exported['model'].sd_config() and meta['model_args']['sd_rule'] == 'paper'
    assert timm.create_model('sd_resnet20', **meta['model_args']).survival_probs == pytest.approx(exported['probs'])


# --- Runtime ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('batch', [1, 3, 64])
def test_parity_random_inputs_dynamic_batch(exported, batch):
    x = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32), dtype=np.float32)
    out = OnnxClassifier(exported['path'])(x)
    assert out.shape == (batch, 10)
    assert within_tol(out, torch_logits(exported['model'], x))


def test_parity_cifar(exported, cifar):
    images, _ = cifar
    clf = OnnxClassifier(exported['path'])
    ref = torch_logits(exported['model'], data.normalize(torch.from_numpy(images), clf.mean, clf.std))
    out = clf.predict_uint8(images)
    assert within_tol(out, ref)
    # The evaluate contract: uint8 NHWC torch batches go through the same normalisation.
    np.testing.assert_array_equal(clf(torch.from_numpy(images[:16])), out[:16])


def test_two_sessions_bit_identical(exported):
    x = np.random.default_rng(1).standard_normal((16, 3, 32, 32), dtype=np.float32)
    a, b = OnnxClassifier(exported['path'])(x), OnnxClassifier(exported['path'])(x)
    assert np.array_equal(a, b)


def test_cuda_request_fails_loudly_without_cuda(exported):
    import onnxruntime as ort
    if 'CUDAExecutionProvider' in ort.get_available_providers():
        pytest.skip('this onnxruntime has CUDA')
    with pytest.raises(ConfigError, match='CUDAExecutionProvider'):
        OnnxClassifier(exported['path'], provider='cuda')


@pytest.fixture(scope='module')
def exported_fp16(exported):
    path = exported['tmp'] / 'half' / 'sd_fp16.onnx'
    return dict(path=path, report=export_onnx(exported['model'], path, fp16=True))


def test_fp16(exported, exported_fp16, cifar):
    report = exported_fp16['report']
    proto = onnx.load(exported_fp16['path'])
    assert proto.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert {t.data_type for t in proto.graph.initializer if t.name.endswith('weight')} == {TensorProto.FLOAT16}
    assert report.precision == 'fp16' and report.op_counts.get('Cast') == 2
    images, _ = cifar
    full, half = OnnxClassifier(exported['path']), OnnxClassifier(exported_fp16['path'])
    a, b = full.predict_uint8(images), half.predict_uint8(images)
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.99
    assert within_tol(b, a, 1e-2)


def test_fp16_refuses_overflow(tmp_path):
    model = sd_model().eval()
    with torch.no_grad():
        model.fc.weight.mul_(1e6)  # logits far past float16's 65504
    with pytest.raises(ExportError, match='float16 would overflow'):
        export_onnx(model, tmp_path / 'inf.onnx', fp16=True)
    assert not (tmp_path / 'inf.onnx').exists()


def test_torchscript_exporter_fixed_batch(tmp_path):
    model = sd_model()
    report = export_onnx(model, tmp_path / 'ts.onnx', exporter='torchscript', batch=8)
    plain = export_onnx(sd_model(drop_path_rate=0.0), tmp_path / 'ts_plain.onnx', exporter='torchscript', batch=8)
    assert report.exporter == 'torchscript' and report.op_counts == plain.op_counts
    assert 'Mul' not in report.op_counts
    clf = OnnxClassifier(tmp_path / 'ts.onnx')
    assert clf.input_shape == (8, 3, 32, 32)
    x = np.random.default_rng(2).standard_normal((8, 3, 32, 32), dtype=np.float32)
    assert within_tol(clf(x), torch_logits(model, x))
    # Other batch sizes run in chunks of 8, the last one padded.
    np.testing.assert_allclose(clf(np.concatenate([x, x[:3]])), np.concatenate([clf(x), clf(x)[:3]]), rtol=0, atol=1e-6)
    with pytest.raises(InputShapeError, match=r'\(8, 3, 32, 32\)'):
        clf(x[:, :, :16])


@pytest.mark.slow
def test_resnet110_graph_and_parity(tmp_path):
    model = sd_model('sd_resnet110')
    report = export_onnx(model, tmp_path / 'r110.onnx')
    plain = export_onnx(sd_model('sd_resnet110', drop_path_rate=0.0), tmp_path / 'plain110.onnx')
    ops = report.op_counts
    # 109 convs of the plain net, plus the two transition shortcuts exported as 1x1 convs.
    assert ops == plain.op_counts and ops['Conv'] == 111 and ops['Add'] == 54 and 'Mul' not in ops
    x = np.random.default_rng(3).standard_normal((4, 3, 32, 32), dtype=np.float32)
    assert within_tol(OnnxClassifier(tmp_path / 'r110.onnx')(x), torch_logits(model, x))


# --- Errors ----------------------------------------------------------------------------------------

def test_unknown_model(tmp_path):
    with pytest.raises(ConfigError, match='unknown model'):
        export_onnx('sd_resnet_nope', tmp_path / 'x.onnx')


def test_checkpoint_of_another_architecture(tmp_path):
    ckpt = save_weights(sd_model(), tmp_path / 'r20.safetensors')
    with pytest.raises(WeightsError, match='missing keys: .*unexpected keys'):
        export_onnx('sd_resnet32', tmp_path / 'x.onnx', checkpoint=ckpt)


def test_unwritable_output(tmp_path):
    blocker = tmp_path / 'file'
    blocker.write_text('not a folder')
    with pytest.raises(ExportError, match='cannot write'):
        export_onnx(sd_model(), blocker / 'model.onnx')
    with pytest.raises(ExportError, match='is a directory'):
        export_onnx(sd_model(), tmp_path)


def test_opset_too_old(tmp_path):
    with pytest.raises(ConfigError, match=f'minimum is {MIN_OPSET}'):
        export_onnx(sd_model(), tmp_path / 'x.onnx', opset=13)


def test_not_an_onnx_file(tmp_path):
    bad = tmp_path / 'weights.onnx'
    bad.write_bytes(b'\x00not a protobuf' * 10)
    with pytest.raises(ExportError, match='not an ONNX model'):
        OnnxClassifier(bad)
    with pytest.raises(ExportError, match='does not exist'):
        OnnxClassifier(tmp_path / 'missing.onnx')


def test_onnx_classifier_says_which_input_it_takes(exported):
    clf = OnnxClassifier(exported['path'])
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    images[0, 0, 0] = 255
    normalized = normalize_uint8(images, clf.mean, clf.std)
    np.testing.assert_array_equal(clf(images), clf(normalized))  # the two forms it takes agree
    left_in_0_255 = r'takes float \(N, C, H, W\) normalised as \(x / 255 - mean\) / std, .* reaches 255: divide'
    for x, message in (
            (images.transpose(0, 3, 1, 2).astype(np.float32), left_in_0_255),
            (torch.from_numpy(images).permute(0, 3, 1, 2).float(), left_in_0_255),
            (images.astype(np.int64), r'takes uint8 images \(N, H, W, C\).* or float .*, got int64 of shape'),
            (np.ascontiguousarray(images.transpose(0, 3, 1, 2)),
             r'with C = 3, got shape \(2, 3, 32, 32\) \(channels first'),
            (normalized.transpose(0, 2, 3, 1), 'channels-last layout')):
        with pytest.raises(InputShapeError, match=message):
            clf(x)


def test_export_names_the_weights_file_and_its_digest(tmp_path, capsys):
    own = save_weights(sd_model(), tmp_path / 'own.safetensors', data='cifar10-jpeg75')
    out = tmp_path / 'own.onnx'
    assert main(['export', '--checkpoint', str(own), '-o', str(out), '--json']) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    report, sha = json.loads(lines[-1]), sha256_file(own)
    assert f': sd_resnet20 (own.safetensors, sha256 {sha[:12]}), fp32' in lines[0]
    assert (report['model'], report['source'], report['weights_sha256']) == ('sd_resnet20', 'own.safetensors', sha)
    meta = OnnxClassifier(out).metadata
    assert (meta['model'], meta['source'], meta['weights_sha256']) == ('sd_resnet20', 'own.safetensors', sha)
    tag = 'sd_resnet20.c10j75'
    published = pretrained.load_manifest()[tag]['sha256']
    shipped = pretrained.SHIPPED_DIR / tag / 'model.safetensors'
    for argv, source in ((['--checkpoint', str(shipped)], 'model.safetensors'),
                         (['--model', tag, '--pretrained'], 'pretrained')):
        assert main(['export', *argv, '-o', str(out)]) == 0
        meta = OnnxClassifier(out).metadata
        assert (meta['model'], meta['source'], meta['weights_sha256']) == (tag, source, published)


def test_onnx_that_does_not_fit_the_data(tmp_path):
    # A one-channel, 2-class "classifier" on (N, 1, 28, 28): pool, flatten, duplicate.
    nodes = [helper.make_node('GlobalAveragePool', ['x'], ['p']), helper.make_node('Flatten', ['p'], ['f']),
             helper.make_node('Concat', ['f', 'f'], ['y'], axis=1)]
    graph = helper.make_graph(
        nodes, 'g', [helper.make_tensor_value_info('x', TensorProto.FLOAT, ['N', 1, 28, 28])],
        [helper.make_tensor_value_info('y', TensorProto.FLOAT, ['N', 2])])
    path = tmp_path / 'gray.onnx'
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid('', 18)]), path)
    clf = OnnxClassifier(path)
    with pytest.raises(ExportError, match='1-channel input.*28x28 input.*2 outputs'):
        check_fits_dataset(clf, 'cifar10-jpeg75', (32, 32, 3))
    with pytest.raises(InputShapeError, match='channels-last'):
        clf(np.zeros((2, 28, 28, 1), np.float32))


# --- Command line ----------------------------------------------------------------------------------

def test_cli_export_and_validate(tmp_path, capsys, cifar):
    model = sd_model(drop_path_rate=0.3, sd_schedule='uniform')
    ckpt = save_weights(model, tmp_path / 'run' / 'final.safetensors', data='cifar10-jpeg75')
    out = tmp_path / 'out' / 'model.onnx'
    assert main(['export', '--checkpoint', str(ckpt), '-o', str(out), '--json']) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report['folded_blocks'] == 9 and 'Mul' not in report['op_counts']
    clf = OnnxClassifier(out)
    assert timm.create_model('sd_resnet20', **clf.metadata['model_args']).survival_probs == pytest.approx([0.7] * 9)
    assert clf.metadata['source'] == 'final.safetensors'
    assert main(['validate', str(out), '--data', 'cifar10-jpeg75', '--checkpoint', str(ckpt), '--limit', '200',
                 '--json']) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result['n'] == 200 and result['top1_agreement'] == 100.0
    assert result['max_abs_diff'] <= 1e-4 * max(1.0, result['reference_logit_scale'])


def test_cli_overrides_and_unknown_settings(tmp_path, capsys):
    from safetensors.torch import save_file

    model = sd_model()
    bare = tmp_path / 'bare.safetensors'
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(bare), metadata={'format': 'pt'})
    out = tmp_path / 'bare.onnx'
    with pytest.warns(UserWarning, match='no stochastic-depth settings'):
        assert main(['export', '--model', 'sd_resnet20', '--checkpoint', str(bare), '-o', str(out)]) == 0
    assert main(['export', '--model', 'sd_resnet20', '--checkpoint', str(bare), '-o', str(out),
                 '--drop-path-rate', '0.2', '--sd-schedule', 'uniform']) == 0
    clf = OnnxClassifier(out)
    assert timm.create_model('sd_resnet20', **clf.metadata['model_args']).survival_probs == pytest.approx([0.8] * 9)
    x = np.random.default_rng(4).standard_normal((2, 3, 32, 32), dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        reference = timm.create_model('sd_resnet20', drop_path_rate=0.2, sd_schedule='uniform')
    reference.load_state_dict(model.state_dict())
    assert within_tol(clf(x), torch_logits(reference, x))
    capsys.readouterr()
    assert main(['export', '--model', 'sd_resnet20', '-o', str(out), '--opset', '11']) == 2
    assert f'minimum is {MIN_OPSET}' in capsys.readouterr().err
    assert main(['validate', str(tmp_path / 'bare.safetensors')]) == 2
    assert 'not an ONNX model' in capsys.readouterr().err


def test_validate_compare_fp16(exported, exported_fp16, cifar):
    r = validate_onnx(exported_fp16['path'], limit=100, reference=OnnxClassifier(exported['path']))
    assert r['n'] == 100 and r['top1_agreement'] >= 99.0


def test_the_2x2_shortcut_pool_exports_as_an_exact_conv(tmp_path):
    model = sd_model(sd_shortcut_pool=2)
    report = export_onnx(model, tmp_path / 'pool2.onnx')
    assert report.op_counts.get('Pad', 0) == 0 and report.op_counts.get('AveragePool', 0) == 0
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    assert within_tol(OnnxClassifier(tmp_path / 'pool2.onnx')(x), torch_logits(model, x))
    assert OnnxClassifier(tmp_path / 'pool2.onnx').metadata['model_args']['sd_shortcut_pool'] == 2
