"""Monte-Carlo depth ensembles, calibration metrics, temperature scaling and `sd-zoo eval --mc-samples`."""
import json
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import sd_zoo
from sd_zoo import cli, data
from sd_zoo.evaluation import uncertainty
from sd_zoo.errors import ConfigError
from sd_zoo.evaluation.uncertainty import depth_sampling, gated_blocks, mc_predict

from conftest import need_data

# Five images, three classes; confidences away from the 15 bin edges (multiples of 1/15).
PROBS = torch.tensor([[0.70, 0.20, 0.10],    # label 0: right, confidence 0.70 (bin 10)
                      [0.10, 0.62, 0.28],    # label 2: wrong, 0.62 (bin 9)
                      [0.05, 0.05, 0.90],    # label 2: right, 0.90 (bin 13)
                      [0.42, 0.33, 0.25],    # label 1: wrong, 0.42 (bin 6)
                      [0.20, 0.72, 0.08]],   # label 0: wrong, 0.72 (bin 10, with image 0)
                     dtype=torch.float64)
LABELS = torch.tensor([0, 2, 2, 1, 0])


def test_metrics_match_a_direct_computation_on_hand_made_probabilities():
    m = uncertainty.calibration_metrics(PROBS, LABELS)
    assert m['top1_err'] == pytest.approx(60.0)
    assert m['nll'] == pytest.approx(-(math.log(0.70) + math.log(0.28) + math.log(0.90) + math.log(0.33)
                                       + math.log(0.20)) / 5)
    brier = [0.3 ** 2 + 0.2 ** 2 + 0.1 ** 2, 0.1 ** 2 + 0.62 ** 2 + 0.72 ** 2, 0.05 ** 2 + 0.05 ** 2 + 0.1 ** 2,
             0.42 ** 2 + 0.67 ** 2 + 0.25 ** 2, 0.8 ** 2 + 0.72 ** 2 + 0.08 ** 2]
    assert m['brier'] == pytest.approx(sum(brier) / 5)
    # Bin 10 holds images 0 and 4: accuracy 1/2, mean confidence 0.71; the other bins one image each.
    ece = 2 / 5 * abs(0.5 - 0.71) + 1 / 5 * abs(0 - 0.62) + 1 / 5 * abs(1 - 0.90) + 1 / 5 * abs(0 - 0.42)
    assert m['ece'] == pytest.approx(100 * ece)
    # Most confident first: 0.90 right, 0.72 wrong, 0.70 right, 0.62 wrong, 0.42 wrong.
    risks = [0 / 1, 1 / 2, 1 / 3, 2 / 4, 3 / 5]
    assert m['aurc'] == pytest.approx(sum(risks) / 5)
    assert m['err_at_90_coverage'] == pytest.approx(100 * 3 / 5)  # 4.5 images rounds up to all 5
    assert m['err_at_80_coverage'] == pytest.approx(100 * 2 / 4)
    assert uncertainty.error_at_coverage(PROBS, LABELS, 0.6) == pytest.approx(100 / 3)


def test_low_coverage_errors_count_the_most_confident_images_only():
    """200 images, confidence falling with the index: 1 % is the top 2, 10 % the top 20, 20 % the top 40."""
    conf = torch.linspace(0.99, 0.51, 200, dtype=torch.float64)
    probs = torch.stack([conf, 1 - conf], dim=1)
    wrong = torch.zeros(200, dtype=torch.bool)
    wrong[[1, 5, 6, 30, 170]] = True  # one in the top 2, three in the top 20, four in the top 40 and 160
    labels = wrong.long()  # class 0 is predicted everywhere, so label 1 marks a wrong answer
    order = torch.randperm(200, generator=torch.Generator().manual_seed(0))  # the input order must not matter
    m = uncertainty.calibration_metrics(probs[order], labels[order])
    assert m['err_at_1_coverage'] == pytest.approx(100 * 1 / 2)
    assert m['err_at_10_coverage'] == pytest.approx(100 * 3 / 20)
    assert m['err_at_20_coverage'] == pytest.approx(100 * 4 / 40)
    assert m['err_at_80_coverage'] == pytest.approx(100 * 4 / 160)
    assert m['top1_err'] == pytest.approx(100 * 5 / 200)


def test_ece_is_zero_when_confidence_equals_accuracy_per_bin():
    # Every image has confidence 0.75; 3 of 4 are right.
    probs = torch.tensor([[0.75, 0.25]] * 4, dtype=torch.float64)
    assert uncertainty.expected_calibration_error(probs, torch.tensor([0, 0, 0, 1])) == pytest.approx(0, abs=1e-12)
    assert uncertainty.expected_calibration_error(probs, torch.tensor([0, 1, 1, 1])) == pytest.approx(50)


def test_fitted_temperature_recovers_the_one_that_generated_the_labels():
    """Labels drawn from softmax(z / 2): the NLL minimiser is T = 2 up to sampling noise."""
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(20000, 10, generator=g, dtype=torch.float64)
    labels = torch.multinomial((logits / 2).softmax(dim=1), 1, generator=g).squeeze(1)
    t = uncertainty.fit_temperature(logits, labels)
    assert t == pytest.approx(2.0, rel=0.03)
    nll = lambda temp: F.cross_entropy(logits / temp, labels).item()  # noqa: E731
    assert nll(t) <= min(nll(t * 1.01), nll(t / 1.01), nll(1.0))


def _sd20(**kwargs):
    torch.manual_seed(0)
    return timm.create_model('sd_resnet20', **kwargs).eval()


def test_constant_depth_samples_equal_the_deterministic_net_exactly():
    model = _sd20(drop_path_rate=0.0)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
        with depth_sampling(model, torch.Generator().manual_seed(0)) as sample:
            for i in range(3):
                assert torch.equal(sample(x), expected)
                # The blocks really took the training path (their gates counted the calls).
                assert model.block_stats() == dict(executed=9 * (i + 1), total=9 * (i + 1))
    passes = []
    hook = model.register_forward_hook(lambda *_: passes.append(1))
    result = mc_predict(model, x, samples=30)
    hook.remove()
    assert len(passes) == 1  # all 30 samples are this one network: computed once
    assert torch.allclose(result.probs, expected.double().softmax(dim=1), rtol=0, atol=1e-12)
    assert result.mutual_info.abs().max() < 1e-12
    gated = _sd20(drop_path_rate=0.5)
    gated.register_forward_hook(lambda *_: passes.append(1))
    mc_predict(gated, x, samples=3)
    assert len(passes) == 1 + 3  # with p_L < 1 every sample is its own pass


def test_mc_predict_is_mean_of_sampled_softmax_with_entropy_and_mutual_information():
    model = _sd20(drop_path_rate=0.5)
    x = torch.randn(3, 3, 16, 16)
    result = mc_predict(model, x, samples=5, generator=torch.Generator().manual_seed(7))
    with torch.no_grad(), depth_sampling(model, torch.Generator().manual_seed(7)) as sample:
        p = torch.stack([sample(x).double().softmax(dim=1) for _ in range(5)])  # [S, B, C]
    mean = p.mean(0)
    entropy = -(mean * mean.log()).sum(1)
    assert torch.allclose(result.probs, mean, atol=1e-12)
    assert torch.allclose(result.entropy, entropy, atol=1e-12)
    assert torch.allclose(result.mutual_info, entropy + (p * p.log()).sum(2).mean(0), atol=1e-12)
    assert (result.mutual_info > 1e-6).all()  # depths disagree on a random-weight net
    assert (result.entropy <= math.log(10) + 1e-12).all()


@pytest.mark.parametrize('gate', ['batch', 'sample'])
@pytest.mark.parametrize('rule', ['paper', 'inverted'])
def test_mean_preactivation_over_samples_approaches_the_expected_value_net(rule, gate):
    """Per block, on a fixed input: kept branches as in training; their mean is the eval sum s + E[gate-scale] f."""
    model = _sd20(drop_path_rate=0.5, sd_rule=rule, sd_gate=gate)
    blocks = gated_blocks(model)
    inputs, recorded = {}, []
    hooks = [b.register_forward_pre_hook(lambda m, args: inputs.update({m: args[0].clone()})) for b in blocks]
    for b in blocks:
        b.forward_output = lambda t: recorded.append(t.clone()) or t  # the pre-activation sum
    with torch.no_grad():
        model(torch.randn(1, 3, 8, 8))
        for h in hooks:
            h.remove()
        evals = dict(zip(blocks, recorded))
        n = 1000
        with depth_sampling(model, torch.Generator().manual_seed(0)):
            for b in blocks:
                x, p = inputs[b], b.stochastic_depth.survival_prob
                s, f = b.forward_shortcut(x), b.forward_branch(x)
                recorded.clear()
                if gate == 'batch':
                    for _ in range(n):
                        b(x)
                    samples = torch.cat(recorded)
                else:
                    b(x.expand(n, -1, -1, -1))
                    samples = recorded[0]
                kept_scale = 1 / p if rule == 'inverted' else 1.0
                kept = (samples - s).flatten(1).norm(dim=1) > 1e-6 * f.norm()
                assert 0 < kept.sum() < n
                assert torch.allclose(samples[kept], (s + kept_scale * f).expand_as(samples[kept]), atol=1e-5)
                assert torch.allclose(samples[~kept], s.expand_as(samples[~kept]), atol=1e-6)
                # Relative deviation of the mean is |k/n - p| (paper) or |k/n - p| / p (inverted).
                sigma = math.sqrt(p * (1 - p) / n) * kept_scale
                assert (samples.mean(0) - evals[b][0]).norm() / f.norm() < 5 * sigma


def test_mc_predict_is_deterministic_and_leaves_the_model_and_the_caller_rng_alone():
    model = _sd20(drop_path_rate=0.5).train()
    own = torch.Generator().manual_seed(5)
    model.set_gate_generator(own)
    x = torch.randn(4, 3, 16, 16)
    model(x)  # a training forward: gate statistics, last gates and BN statistics exist
    flags = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    stats, last, own_state, rng = model.block_stats(), model.last_gates, own.get_state(), torch.get_rng_state()

    a = mc_predict(model, x, samples=4, generator=torch.Generator().manual_seed(1))
    b = mc_predict(model, x, samples=4, generator=torch.Generator().manual_seed(1))
    c = mc_predict(model, x, samples=4, generator=torch.Generator().manual_seed(2))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.allclose(a.probs, c.probs)
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # BatchNorm ran in eval mode
    assert model.block_stats() == stats and model.last_gates == last
    assert model.gate_generator is own and all(g.generator is own for g in model.stochastic_depth_modules())
    assert all(g.planned is None for g in model.stochastic_depth_modules())
    assert torch.equal(own.get_state(), own_state) and torch.equal(torch.get_rng_state(), rng)


def test_mc_predict_refuses_bad_sample_counts_and_models_without_stochastic_depth():
    model, x = _sd20(), torch.randn(1, 3, 8, 8)
    for bad in (0, -3, 2.5):
        with pytest.raises(ConfigError, match='positive integer'):
            mc_predict(model, x, samples=bad)
    with pytest.raises(ConfigError, match='has no stochastic-depth gates'):
        mc_predict(timm.create_model('resnet18', num_classes=10), x, samples=2)


def test_temperature_is_fitted_on_validation_images_never_on_test_images(monkeypatch):
    rng = np.random.default_rng(0)
    splits = {s: (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), np.arange(n) % 10)
              for s, n in (('train', 40), ('test', 20))}
    reads, scored, fitted = [], [], {}
    monkeypatch.setattr(data, 'load_split', lambda name, split, root=None: reads.append(split) or splits[split])
    monkeypatch.setattr(data, 'VAL_SIZE', 10)
    score, fit = uncertainty.eval_logits, uncertainty.fit_temperature

    def spy_score(model, images, *args):
        scored.append((images, score(model, images, *args)))
        return scored[-1][1]
    monkeypatch.setattr(uncertainty, 'eval_logits', spy_score)
    monkeypatch.setattr(uncertainty, 'fit_temperature',
                        lambda lg, lb: fitted.update(logits=lg, labels=lb) or fit(lg, lb))

    report = uncertainty.calibration_report(_sd20(), 'cifar10', 2, data.CIFAR10_MEAN, data.CIFAR10_STD,
                                            batch_size=8, progress=False)
    assert sorted(reads) == ['test', 'train'] and (report['n'], report['val_n']) == (20, 10)
    _, val_idx = data.train_val_split(40, 10)
    train_x, train_y = splits['train']
    fitted_on = [images for images, logits in scored if logits is fitted['logits']]
    assert len(fitted_on) == 1 and np.array_equal(fitted_on[0], train_x[val_idx])
    assert np.array_equal(np.asarray(fitted['labels']), train_y[val_idx])
    assert any(np.array_equal(images, splits['test'][0]) for images, _ in scored)  # test images: scored only


@pytest.fixture
def jpeg_data():
    need_data('cifar10-jpeg75')


def test_eval_mc_samples_prints_the_three_rows_json_and_plot(jpeg_data, tmp_path, capsys):
    plot = tmp_path / 'reliability.png'
    rc = cli.main(['eval', '--model', 'sd_resnet20.c10j75', '--data', 'cifar10-jpeg75', '--limit', '100',
                   '--mc-samples', '2', '--batch-size', '50', '--num-threads', '1', '--json', '--plot', str(plot)])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and 'CIFAR-10 (JPEG-75 copy) test (100 images)' in out[0]
    assert any(line.startswith('MC ensemble (2)') for line in out)
    result = json.loads(out[-1])
    assert (result['samples'], result['n'], result['model'], result['data']) == (2, 100, 'sd_resnet20.c10j75',
                                                                                 'cifar10-jpeg75')
    keys = {'top1_err', 'nll', 'brier', 'ece', 'err_at_90_coverage', 'err_at_80_coverage', 'err_at_20_coverage',
            'err_at_10_coverage', 'err_at_1_coverage', 'aurc'}
    for row in ('deterministic', 'temperature_scaled', 'mc'):
        assert set(result[row]) == keys
        assert 0 <= result[row]['ece'] <= 100 and 0 <= result[row]['brier'] <= 2 and result[row]['nll'] > 0
    # A temperature rescales confidences but never changes the predicted class.
    assert result['temperature_scaled']['top1_err'] == result['deterministic']['top1_err']
    assert result['temperature_scaled']['nll'] <= result['deterministic']['nll'] + 0.05  # fitted on other images
    assert plot.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.mark.parametrize('argv, message', [
    (['--mc-samples', '0'], '--mc-samples must be >= 1, got 0'),
    (['--mc-samples', '-2'], '--mc-samples must be >= 1, got -2'),
    (['--mc-samples', '2', '--onnx', 'sd20.onnx'], 'an ONNX file holds only the deterministic'),
    (['--mc-samples', '2', '--split', 'train'], 'measures on the test split'),
    (['--plot', 'r.png'], 'add --mc-samples'),
    (['--mc-samples', '2', '--batch-size', '0'], '--batch-size must be >= 1, got 0'),
])
def test_eval_mc_bad_arguments_fail_cleanly(argv, message, capsys):
    rc = cli.main(['eval', '--model', 'sd_resnet20.c10j75', '--data', 'cifar10-jpeg75'] + argv)
    err = capsys.readouterr().err
    assert rc == 2 and message in err and 'Traceback' not in err


def test_eval_mc_on_a_model_without_stochastic_depth_fails_cleanly(tmp_path, capsys):
    from sd_zoo.weights.checkpoint import save_weights
    path = save_weights(timm.create_model('resnet18', num_classes=10), tmp_path / 'r18.safetensors',
                        data='cifar10-jpeg75', recipe='paper')
    with pytest.warns(UserWarning, match='no stochastic-depth settings'):
        rc = cli.main(['eval', '--checkpoint', str(path), '--data', 'cifar10-jpeg75', '--mc-samples', '2'])
    err = capsys.readouterr().err
    assert rc == 2 and 'ResNet has no stochastic-depth gates' in err and 'Traceback' not in err


def test_mc_predict_is_exported():
    assert sd_zoo.mc_predict is mc_predict
