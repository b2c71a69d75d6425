"""Depth pruning: exactness against a hand-written forward, the zero-survival identity, orders, the timm
interface and saved weights of a pruned net, the ONNX graph's convolution count and parity, importance
on validation images only, the prune-curve measurement, and every user error."""
import json
import re

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import sd_zoo
from sd_zoo import data
from sd_zoo.weights.checkpoint import save_weights
from sd_zoo.cli import main
from sd_zoo.errors import ConfigError
from sd_zoo.evaluation.evaluate import count_params_macs
from sd_zoo.deploy.onnx_export import export_onnx
from sd_zoo.deploy.onnx_runtime import OnnxClassifier
from sd_zoo.deploy.pruning import (
    blocks_to_keep, importance_ranking, prune_blocks, survival_ranking, validation_images
)
from sd_zoo.models.block_slots import ShortcutOnly, apply_keep_blocks, kept_blocks
from sd_zoo.models.sd_cifar_resnet import SDCifarResNet

import test_onnx_export as onnx_tests

FAKE_TRAIN = 5200  # just over the 5,000 validation images the paper's split holds out


def randomize_norms(model, seed=0):
    """Non-trivial BatchNorm statistics and affine parameters, as trained weights have; eval mode."""
    return onnx_tests.randomize_norms(model, seed).eval()


def small_net(**kwargs):
    """CIFAR net with 2 blocks per stage (6 blocks: 0 1 | 2 3 | 4 5, transitions 2 and 4), p_L = 0.5."""
    torch.manual_seed(0)
    return randomize_norms(SDCifarResNet(blocks_per_stage=2, **kwargs))


def fake_split(name, split, root=None):
    """Random uint8 images whose first two pixels encode their index, so a test can tell which were read."""
    n = FAKE_TRAIN if split == 'train' else 300
    rng = np.random.default_rng(1 if split == 'train' else 2)
    x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
    return x, (np.arange(n) % 10).astype(np.int64)


def image_ids(images):
    return images[:, 0, 0, 0].astype(int) + 256 * images[:, 0, 0, 1].astype(int)


# --- Exactness -------------------------------------------------------------------------------------

def hand_forward(model, x, keep):
    """The CIFAR net's test-time forward written out: every kept block adds p_l times its branch."""
    def bn(z, m):
        return (z - m.running_mean.view(1, -1, 1, 1)) / torch.sqrt(m.running_var.view(1, -1, 1, 1) + m.eps) \
            * m.weight.view(1, -1, 1, 1) + m.bias.view(1, -1, 1, 1)

    h = F.relu(bn(F.conv2d(x, model.conv1.weight, padding=1), model.bn1))
    blocks = [b for stage in (model.layer1, model.layer2, model.layer3) for b in stage]
    for l, b in enumerate(blocks):
        p = 1 - (l + 1) / len(blocks) * 0.5  # paper eq. 4 with p_L = 0.5
        transition = l in (2, 4)
        shortcut = F.pad(h[:, :, ::2, ::2], (0, 0, 0, 0, 0, h.shape[1])) if transition else h
        if l in keep:
            f = F.relu(bn(F.conv2d(h, b.conv1.weight, stride=2 if transition else 1, padding=1), b.bn1))
            h = F.relu(shortcut + p * bn(F.conv2d(f, b.conv2.weight, padding=1), b.bn2))
        else:
            h = F.relu(shortcut)
    return F.linear(h.mean((2, 3)), model.fc.weight, model.fc.bias)


@pytest.mark.parametrize('keep', [[0, 1, 2, 3, 4, 5], [0, 3, 5], [1, 2, 4]])
def test_pruned_net_equals_hand_computation(keep):
    model = small_net().double()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        full = model(x)
        pruned = prune_blocks(model, keep)
        out = pruned(x)
        torch.testing.assert_close(out, hand_forward(model, x, keep), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(full, hand_forward(model, x, range(6)), rtol=1e-10, atol=1e-10)
        # The input model is untouched: same tensors, same output, no block replaced.
        torch.testing.assert_close(model(x), full, rtol=0, atol=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert kept_blocks(model) == list(range(6)) and kept_blocks(pruned) == keep
    if len(keep) < 6:
        assert not torch.allclose(out, full)


@pytest.mark.parametrize('name,keep', [('sd_resnet20', [0, 2, 5, 8]), ('sd_resnet50', [0, 3, 8, 10, 14])])
def test_pruning_equals_zero_survival_probability(name, keep):
    """Removing a branch is the expected-value net with p_l = 0 for that block (basic and bottleneck blocks)."""
    torch.manual_seed(0)
    model = randomize_norms(timm.create_model(name, num_classes=10))
    probs = list(model.survival_probs)
    zeroed = timm.create_model(name, num_classes=10, sd_probs=[p if i in keep else 0.0 for i, p in enumerate(probs)])
    zeroed.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    pruned = prune_blocks(model, keep)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), zeroed.eval()(x), rtol=1e-5, atol=1e-5)
    assert pruned.survival_probs == [probs[i] for i in keep]
    # Kept parameters keep their names; a bottleneck keeps its projection shortcut, loses its 3 convs.
    assert set(pruned.state_dict()) < set(model.state_dict())
    convs = lambda m: sum(isinstance(c, torch.nn.Conv2d) for c in m.modules())  # noqa: E731
    per_block = 3 if name == 'sd_resnet50' else 2
    assert convs(model) - convs(pruned) == per_block * (model.num_blocks - len(keep))


# --- Orders ---------------------------------------------------------------------------------------

def test_survival_order_drops_lowest_probability_first_and_keeps_a_block_per_stage():
    model = timm.create_model('sd_resnet20')  # linear decay: p_l falls with l
    ranking = survival_ranking(model)
    assert ranking == [8, 7, 6, 5, 4, 3, 2, 1, 0]
    kept = {n: blocks_to_keep(model, n, ranking) for n in range(9, 2, -1)}
    assert kept[7] == [0, 1, 2, 3, 4, 5, 6]
    assert kept[6] == [0, 1, 2, 3, 4, 6]  # block 6 is the last of stage 3, so block 5 goes instead
    assert kept[3] == [0, 3, 6]
    assert all(set(kept[n - 1]) < set(kept[n]) for n in range(4, 10))  # nested nets
    assert prune_blocks(model, 5).sd_keep_blocks == kept[5]


def test_survival_ties_go_to_the_later_block_and_explicit_orders():
    constant = timm.create_model('sd_resnet20', drop_path_rate=0.0)
    assert survival_ranking(constant) == [8, 7, 6, 5, 4, 3, 2, 1, 0]
    probs = [0.9, 0.5, 0.9, 0.8, 0.5, 0.9, 0.7, 0.9, 0.5]
    explicit = timm.create_model('sd_resnet20', sd_probs=probs)
    assert survival_ranking(explicit) == [8, 4, 1, 6, 3, 7, 5, 2, 0]
    # Block 2 would empty stage 1 after 0 and 1 went, so it is passed over.
    assert prune_blocks(explicit, 6, order=[0, 1, 2, 4]).sd_keep_blocks == [2, 3, 5, 6, 7, 8]
    assert prune_blocks(explicit, 6, order=[1, 2, 4, 0]).sd_keep_blocks == [0, 3, 5, 6, 7, 8]
    # A pruned net prunes further, ranking only the blocks it still has.
    again = prune_blocks(prune_blocks(explicit, 6, order=[1, 2, 4]), 4)
    assert again.sd_keep_blocks == [0, 3, 5, 7]


def test_importance_ranks_on_validation_images_only(monkeypatch):
    """Blocks are scored on the validation images held out of the training split; the test split is never read."""
    reads = []

    def recording(name, split, root=None):
        reads.append(split)
        return fake_split(name, split, root)
    monkeypatch.setattr(data, 'load_split', recording)
    model = small_net()
    images, labels = validation_images('cifar10', 60)
    _, val = data.train_val_split(FAKE_TRAIN)
    assert set(image_ids(images)) <= set(val) and len(set(image_ids(images))) == 60

    ranking, scores = importance_ranking(model, 'cifar10', num_images=60, progress=False)
    assert set(reads) == {'train'}
    assert sorted(ranking) == list(range(6))
    harm = [(scores[i]['top1_err'], scores[i]['loss'], -i) for i in ranking]
    assert harm == sorted(harm)
    # Each score is the net with that one block pruned, on exactly those images.
    x = data.normalize(torch.as_tensor(images), data.CIFAR10_MEAN, data.CIFAR10_STD)
    with torch.no_grad():
        loss = F.cross_entropy(prune_blocks(model, [0, 1, 3, 4, 5])(x), torch.as_tensor(labels))
    assert scores[2]['loss'] == pytest.approx(float(loss), rel=1e-5)
    assert prune_blocks(model, 4, order='importance', data='cifar10', num_images=60,
                        progress=False).sd_keep_blocks == blocks_to_keep(model, 4, ranking)
    assert 'test' not in reads


# --- A pruned net is a full timm model ------------------------------------------------------------

def test_pruned_model_keeps_the_timm_interface_and_its_weights_travel(tmp_path):
    model = randomize_norms(timm.create_model('sd_resnet20'))
    pruned = prune_blocks(model, [0, 1, 4, 7])
    assert isinstance(pruned.layer2[0], ShortcutOnly) and pruned.num_blocks == 4
    assert pruned.sd_config()['sd_keep_blocks'] == [0, 1, 4, 7]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = pruned.forward_features(x)
        assert feats.shape == (2, 64, 8, 8)
        assert torch.equal(pruned.forward_head(feats), pruned(x))
        assert pruned.forward_head(feats, pre_logits=True).shape == (2, 64)
        # Saved weights rebuild the same pruned net, through load_model and through create_model.
        path = save_weights(pruned, tmp_path / 'pruned.safetensors', model_name='sd_resnet20')
        loaded = sd_zoo.load_model(path)
        assert loaded.sd_keep_blocks == [0, 1, 4, 7]
        torch.testing.assert_close(loaded(x), pruned(x), rtol=0, atol=0)
        features = timm.create_model('sd_resnet20', features_only=True, sd_keep_blocks=[0, 1, 4, 7])
        assert [f.shape[1] for f in features(x)] == [16, 16, 32, 64]
    pruned.reset_classifier(5)
    assert pruned(x).shape == (2, 5)
    train_out = pruned.train()(x)  # training mode draws gates for the kept blocks only
    assert train_out.shape == (2, 5) and len(pruned.last_gates) == 4


# --- ONNX -----------------------------------------------------------------------------------------

def test_pruned_onnx_has_two_fewer_convs_per_block_and_matches_pytorch(tmp_path):
    model = randomize_norms(timm.create_model('sd_resnet20'))
    keep = [0, 5, 7]  # drops both transition blocks (3 and 6), whose shortcuts become 1x1 convs
    full = export_onnx(model, tmp_path / 'full.onnx')
    report = export_onnx(model, tmp_path / 'pruned.onnx', keep_blocks=keep)
    assert full.op_counts['Conv'] == 21  # stem + 2 per block + 2 transition shortcuts
    assert report.op_counts['Conv'] == 21 - 2 * 6
    pruned = prune_blocks(model, keep)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = pruned(x).numpy()
    out = OnnxClassifier(tmp_path / 'pruned.onnx', threads=1)(x.numpy())
    assert np.abs(out - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    assert OnnxClassifier(tmp_path / 'pruned.onnx').metadata['model_args']['sd_keep_blocks'] == keep
    assert kept_blocks(model) == list(range(9))


def test_cli_export_keep_blocks(tmp_path, capsys):
    out = tmp_path / 'p.onnx'
    assert main(['export', '--model', 'sd_resnet20', '-o', str(out), '--keep-blocks', '5', '--json']) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report['op_counts']['Conv'] == 21 - 2 * 4
    assert json.loads(report['metadata']['sd_zoo.model_args'])['sd_keep_blocks'] == [0, 1, 2, 3, 6]


# --- prune-curve ----------------------------------------------------------------------------------

def test_macs_fall_by_each_dropped_branch():
    """A basic block's branch costs 2 x 9 C^2 H W multiply-accumulates (2 C_in C H W 9 / 2 at a transition)."""
    model = timm.create_model('sd_resnet20')
    macs = {n: count_params_macs(prune_blocks(model, n))[1] for n in range(9, 2, -1)}
    ranking = survival_ranking(model)
    for n in range(9, 3, -1):
        dropped = (set(blocks_to_keep(model, n, ranking)) - set(blocks_to_keep(model, n - 1, ranking))).pop()
        c, hw = (16, 32 * 32) if dropped < 3 else (32, 16 * 16) if dropped < 6 else (64, 8 * 8)
        first = dropped in (3, 6)  # conv1 reads half the channels
        assert macs[n] - macs[n - 1] == 9 * c * c * hw * (1.5 if first else 2)


def test_curve_depths():
    from sd_zoo.deploy.prune_curve import depths

    assert depths(timm.create_model('sd_resnet20')) == [9, 8, 7, 6, 5, 4, 3]
    assert depths(small_net()) == [6, 5, 4, 3]
    assert depths(prune_blocks(timm.create_model('sd_resnet50'), 9)) == [9, 8, 7, 6, 5, 4]


def test_prune_curve_cli(tmp_path, capsys, monkeypatch):
    import sd_zoo.deploy.prune_curve as pc
    from sd_zoo.evaluation.evaluate import evaluate_model, model_logits_fn

    torch.manual_seed(0)
    model = randomize_norms(timm.create_model('sd_resnet20'))
    # Test labels are the full net's own predictions: it scores 0 % and a pruned net does not, so a row that
    # scored the wrong net would show (random labels leave every depth at chance, 90 %).
    x_test = fake_split('cifar10', 'test')[0]
    own = model_logits_fn(model, data.CIFAR10_MEAN, data.CIFAR10_STD)(torch.as_tensor(x_test)).argmax(1).numpy()
    monkeypatch.setattr(data, 'load_split', lambda name, split, root=None:
                        (x_test, own) if split == 'test' else fake_split(name, split, root))
    monkeypatch.setattr(pc, 'REPEATS', {1: 3, 64: 2})
    # Three depths instead of seven keep the test short; test_curve_depths checks the full range.
    weights = save_weights(model, tmp_path / 'w.safetensors', model_name='sd_resnet20', data='cifar10')
    plot = tmp_path / 'curve.png'
    assert main(['prune-curve', '--model', str(weights), '--data', 'cifar10', '--json', '--plot', str(plot),
                 '--blocks', '9,5,3', '--quiet']) == 0
    curve = json.loads(capsys.readouterr().out.strip().splitlines()[-1])['curves'][str(weights)]
    assert [r['blocks'] for r in curve] == [9, 5, 3]
    assert [r['kept'] for r in curve] == [list(range(9)), [0, 1, 2, 3, 6], [0, 3, 6]]
    assert set(curve[0]) >= {'blocks', 'top1_err', 'macs', 'latency_ms_bs1', 'latency_ms_bs64'}
    assert all(a['macs'] > b['macs'] for a, b in zip(curve, curve[1:]))
    assert all(r['latency_ms_bs1'] > 0 and r['latency_ms_bs64'] > 0 for r in curve)
    # Every row is the error of its own pruned net, scored here independently of the command.
    errors = [round(evaluate_model(prune_blocks(model, r['kept']), 'cifar10')['top1_err'], 2) for r in curve]
    assert [r['top1_err'] for r in curve] == errors
    assert errors[0] == 0.0 and min(errors[1:]) > 0
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b'\x89PNG'


def test_error_labels_skip_only_points_whose_label_would_cover_another():
    from matplotlib.figure import Figure
    from sd_zoo.deploy.prune_curve import label_errors

    dense = [dict(blocks=b, top1_err=10.0) for b in (54, 53, 52)]  # one block apart, the same error
    sparse = [dict(blocks=b, top1_err=e) for b, e in ((54, 10.5), (30, 50.0), (3, 90.0))]
    ax = Figure(figsize=(13, 4)).subplots(1, 3)[0]
    lines = [ax.plot([r['blocks'] for r in c], [r['top1_err'] for r in c])[0] for c in (dense, sparse)]
    labelled = label_errors(ax, {'dense': dense, 'sparse': sparse})
    # Both full nets keep a label though their points coincide: the second goes below its point. Blocks 53
    # and 52 of the dense curve would cover those two labels both above and below, so they get none.
    assert labelled == [dense[0], sparse[0], sparse[1], sparse[2]]
    assert [t.get_text() for t in ax.texts] == ['10.0', '10.5', '50.0', '90.0']
    assert [t.xyann[1] > 0 for t in ax.texts] == [True, False, True, True]
    assert [t.get_color() for t in ax.texts] == [lines[0].get_color()] + [lines[1].get_color()] * 3


def test_prune_curve_replot_draws_the_saved_curves_without_measuring(tmp_path, monkeypatch):
    import sd_zoo.cli.prune_curve as cli_pc

    rows = [dict(blocks=b, top1_err=e, macs=1e6 * b, latency_ms_bs1=0.1 * b, latency_ms_bs64=5.0 * b, kept=[0])
            for b, e in ((9, 8.5), (5, 30.0), (3, 70.0))]
    saved = dict(curves={'a': rows, 'b': rows[::2]}, data='cifar10', split='test', images=None,
                 prune_order=[8, 7, 5], threads=1)
    # The whole output of a --json run: the table first, the JSON object last.
    output = tmp_path / 'prune.out'
    output.write_text('CIFAR-10 test split ...\nmodel  blocks ...\n' + json.dumps(saved) + '\n')
    drawn = []
    real = cli_pc.plot_curves
    monkeypatch.setattr(cli_pc, 'plot_curves', lambda c, path, title: drawn.append((c, title)) or real(c, path, title))
    monkeypatch.setattr(cli_pc, 'measure_curves', lambda *a, **k: pytest.fail('--replot measured'))
    plot = tmp_path / 'curve.png'
    assert main(['prune-curve', '--replot', str(output), '--plot', str(plot)]) == 0
    assert drawn == [(saved['curves'], f'Depth pruning, explicit order; {data.dataset_info("cifar10").title}, '
                                      f'test split')]
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b'\x89PNG'


# --- User errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize('keep,order,message', [
    (10, 'survival', 'keep=10: this model has 9 residual blocks'),
    (-1, 'survival', 'keep between 3 (one per stage) and 9'),
    (2, 'survival', 'keep between 3 (one per stage) and 9'),
    (5, 'depth', "unknown prune order 'depth'"),
    (5, [8, 12], 'block index 12 is out of range; this net has 9 residual blocks'),
    (5, [8, 7], 'names too few blocks to keep only 5'),
    ([0, 3, 9], 'survival', 'block index 9 is out of range'),
    ([0, 1, 3], 'survival', 'leaves stage 3 (blocks 6 to 8) empty'),
    ([0, 3, 3, 6], 'survival', 'block indices repeat'),
    (5, 'importance', 'name the training data'),
])
def test_bad_prune_requests(keep, order, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        prune_blocks(timm.create_model('sd_resnet20'), keep, order)


def test_already_pruned_block_and_create_model_errors():
    pruned = prune_blocks(timm.create_model('sd_resnet20'), [0, 3, 6])
    with pytest.raises(ConfigError, match='block 4 was already pruned'):
        apply_keep_blocks(pruned, [0, 3, 4, 6])
    with pytest.raises(ConfigError, match='block index 11 is out of range'):
        timm.create_model('sd_resnet20', sd_keep_blocks=[0, 3, 11])


@pytest.mark.parametrize('argv,message', [
    (['--keep-blocks', '12'], 'keep=12: this model has 9 residual blocks'),
    (['--keep-blocks', '2'], 'keep=2: this model has 9 residual blocks in 3 stages; keep between 3'),
    (['--keep-blocks', '4', '--prune-order', '0,1,99'], 'block index 99 is out of range'),
])
def test_cli_prune_errors(tmp_path, capsys, argv, message):
    out = tmp_path / 'x.onnx'
    assert main(['export', '--model', 'sd_resnet20', '-o', str(out)] + argv) == 2
    err = capsys.readouterr().err
    assert message in err and 'Traceback' not in err
    assert not out.exists()


def test_cli_unknown_prune_order(tmp_path, capsys):
    for command in (['export', '--model', 'sd_resnet20', '-o', str(tmp_path / 'x.onnx'), '--keep-blocks', '4'],
                    ['prune-curve', '--model', 'sd_resnet20.c10j75', '--data', 'cifar10']):
        assert main(command + ['--prune-order', 'deepest']) == 2
        assert ("argument --prune-order: expected survival or importance or comma-separated block indices, "
                "got 'deepest'") in capsys.readouterr().err


def test_importance_data_defaults_to_what_the_weights_were_trained_on(tmp_path):
    from sd_zoo.deploy.pruning import training_data

    assert training_data(sd_zoo.load_model('sd_resnet20.c10j75')) == 'cifar10-jpeg75'
    assert training_data(timm.create_model('sd_resnet20')) is None  # a fresh net saw no data
    path = save_weights(timm.create_model('sd_resnet20'), tmp_path / 'w.safetensors', model_name='sd_resnet20',
                        data='cifar100-jpeg75')
    assert training_data(sd_zoo.load_model(path, num_classes=10)) == 'cifar100-jpeg75'


def test_model_card_table_picks_evenly_spaced_depths(monkeypatch):
    import sd_zoo.deploy.prune_curve as pc

    asked = {}

    def fake_measure(models, data_name, order, limit, blocks=None, progress=False):
        asked.update(blocks=blocks, order=order, data=data_name)
        return {'model': [dict(blocks=n) for n in blocks]}
    monkeypatch.setattr(pc, 'measure_curves', fake_measure)
    rows = pc.pruning_table(timm.create_model('sd_resnet110'), 'cifar10-jpeg75')
    assert asked['blocks'] == [54, 46, 37, 28, 20, 12, 3] and [r['blocks'] for r in rows] == asked['blocks']
    pc.pruning_table(timm.create_model('sd_resnet20'), 'cifar10-jpeg75', order='importance')
    assert asked == dict(blocks=[9, 8, 7, 6, 5, 4, 3], order='importance', data='cifar10-jpeg75')


def test_published_weights_load_pruned_by_name():
    import sd_zoo
    keep = [0, 3, 6]
    pruned = sd_zoo.load_model('sd_resnet20.c10j75', sd_keep_blocks=keep)
    reference = sd_zoo.prune_blocks(sd_zoo.load_model('sd_resnet20.c10j75'), keep)
    x = torch.randn(2, 3, 32, 32)
    assert pruned.sd_config()['sd_keep_blocks'] == keep and pruned.num_blocks == 3
    torch.testing.assert_close(pruned(x), reference(x), rtol=0, atol=0)
