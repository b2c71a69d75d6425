"""Evaluation: error counting, rebuilding a trained model from safetensors metadata, the eval command."""
import argparse
import importlib.util
import json

import numpy as np
import pytest
import torch

import sd_zoo  # noqa: F401  (registers the models)
import timm
from sd_zoo import cli
from sd_zoo.cli import eval as eval_command
from sd_zoo.evaluation import evaluate
from sd_zoo.weights import pretrained
from sd_zoo.weights.checkpoint import save_weights
from sd_zoo.data import CIFAR10_MEAN, CIFAR10_STD
from sd_zoo.errors import ConfigError
from sd_zoo.files import sha256_file

from conftest import need_data


def _save(model, path, data_name='cifar10-jpeg75'):
    return save_weights(model, path, data=data_name, recipe='paper')


@pytest.fixture
def jpeg_test_set():
    need_data('cifar10-jpeg75')


def test_every_scorer_refuses_data_of_another_class_count_before_reading_it(monkeypatch, tmp_path):
    from sd_zoo.deploy.prune_curve import measure_curves
    from sd_zoo.deploy.pruning import importance_ranking
    from sd_zoo.evaluation.uncertainty import calibration_report

    monkeypatch.setenv('SD_ZOO_DATA', str(tmp_path))  # nothing there: reading the data first would fail otherwise
    model = sd_zoo.load_model('sd_resnet20', pretrained=False, num_classes=100)
    for score in (lambda: evaluate.evaluate_model(model, 'cifar10-jpeg75'),
                  lambda: importance_ranking(model, 'cifar10-jpeg75', progress=False),
                  lambda: calibration_report(model, 'cifar10-jpeg75', 2, CIFAR10_MEAN, CIFAR10_STD),
                  lambda: measure_curves({'sd_resnet20': model}, 'cifar10-jpeg75', progress=False)):
        with pytest.raises(ConfigError, match='^sd_resnet20 has 100 classes but cifar10-jpeg75 has 10; give the data'):
            score()


def test_evaluate_counts_top1_and_top5_from_numpy_logits():
    labels = torch.arange(10)
    images = torch.zeros(10, 32, 32, 3, dtype=torch.uint8)
    images[:, 0, 0, 0] = labels  # each image carries its label, for a predictor that reads it

    def perfect(x):  # numpy out, as an ONNX runtime gives
        return np.eye(10, dtype=np.float32)[x[:, 0, 0, 0].numpy()]

    def ranked(x):  # always ranks class 9 first, then 8, 7, ...: top-1 right once, top-5 for labels 5..9
        return np.tile(np.arange(10, dtype=np.float32), (len(x), 1))

    assert evaluate.evaluate(perfect, images, labels, batch_size=3) == dict(top1_err=0.0, top5_err=0.0, n=10)
    result = evaluate.evaluate(ranked, images, labels, batch_size=4)
    assert result['top1_err'] == pytest.approx(90.0) and result['top5_err'] == pytest.approx(50.0)


def test_eval_rebuilds_the_checkpoint_with_its_stochastic_depth_settings(tmp_path):
    """Eval-mode outputs depend on p_l (the paper rule scales each branch by it): they must be the trained ones."""
    model = timm.create_model('sd_resnet20', drop_path_rate=0.9, sd_schedule='uniform')
    path = _save(model, tmp_path / 'w.safetensors')
    args = argparse.Namespace(onnx=None, checkpoint=str(path), model=None, data='cifar10-jpeg75', device='cpu')
    logits_fn, named = eval_command._build(args)
    assert (named.model, named.weights, named.sha256) == ('sd_resnet20', str(path), sha256_file(path))
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    expected = evaluate.model_logits_fn(model, CIFAR10_MEAN, CIFAR10_STD)(images)
    assert torch.equal(logits_fn(images), expected)
    default = timm.create_model('sd_resnet20')
    default.load_state_dict(model.state_dict())
    assert not torch.allclose(evaluate.model_logits_fn(default, CIFAR10_MEAN, CIFAR10_STD)(images), expected)


def test_eval_command_prints_json_last(jpeg_test_set, tmp_path, capsys):
    path = _save(timm.create_model('sd_resnet20'), tmp_path / 'w.safetensors')
    rc = cli.main(['eval', '--checkpoint', str(path), '--data', 'cifar10-jpeg75', '--limit', '100',
                   '--batch-size', '40', '--num-threads', '1', '--json'])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert 'top-1 error' in lines[0] and 'CIFAR-10 (JPEG-75 copy)' in lines[0]
    result = json.loads(lines[-1])
    assert {'top1_err', 'top5_err', 'n', 'model', 'data'} <= set(result)
    assert result['n'] == 100 and result['model'] == 'sd_resnet20' and result['data'] == 'cifar10-jpeg75'
    assert 0 <= result['top5_err'] <= result['top1_err'] <= 100


def test_eval_names_the_weights_it_scored(jpeg_test_set, tmp_path, capsys):
    """A file by its path and sha256; a published tag's name only for that tag's published weights."""
    tag = 'sd_resnet20.c10j75'
    shipped = pretrained.SHIPPED_DIR / tag / 'model.safetensors'
    own = _save(timm.create_model('sd_resnet20'), tmp_path / 'own.safetensors')

    def run(*argv):
        assert cli.main(['eval', '--data', 'cifar10-jpeg75', '--limit', '50', '--json', *argv]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        return lines[0], json.loads(lines[-1])

    sha = sha256_file(own)
    line, result = run('--checkpoint', str(own))
    assert line.startswith(f'sd_resnet20 ({own}, sha256 {sha[:12]}) on CIFAR-10'), line
    assert (result['model'], result['weights'], result['weights_sha256']) == ('sd_resnet20', str(own), sha)
    published = pretrained.load_manifest()[tag]['sha256']
    line, by_tag = run('--model', tag)
    assert line.startswith(f'{tag} on CIFAR-10') and (by_tag['model'], by_tag['weights']) == (tag, tag)
    assert by_tag['weights_sha256'] == published == sha256_file(shipped)
    for argv in (['--checkpoint', str(shipped)], ['--model', tag, '--checkpoint', str(shipped)]):
        line, result = run(*argv)  # the published file is the tag's weights, however it is given
        assert (result['model'], result['weights'], result['weights_sha256']) == (tag, str(shipped), published)
        assert result['top1_err'] == by_tag['top1_err'] != run('--checkpoint', str(own))[1]['top1_err']


def test_eval_command_reports_mismatch_without_traceback(jpeg_test_set, tmp_path, capsys):
    path = _save(timm.create_model('sd_resnet20'), tmp_path / 'w.safetensors')
    rc = cli.main(['eval', '--model', 'sd_resnet32', '--checkpoint', str(path), '--data', 'cifar10-jpeg75'])
    err = capsys.readouterr().err
    assert rc == 2 and 'does not fit sd_resnet32' in err and 'Traceback' not in err
    rc = cli.main(['eval', '--checkpoint', str(path), '--data', 'cifar100-jpeg75'])
    assert rc == 2 and 'has 10 classes but cifar100-jpeg75 has 100' in capsys.readouterr().err


def test_evaluate_model_matches_the_command(jpeg_test_set, capsys):
    # Trained weights: errors far from chance, so a different normalisation or subset would show.
    model = sd_zoo.load_model('sd_resnet20.c10j75')
    result = evaluate.evaluate_model(model, 'cifar10-jpeg75', limit=50)
    assert result['n'] == 50 and set(result) == {'top1_err', 'top5_err', 'n'}
    assert cli.main(['eval', '--model', 'sd_resnet20.c10j75', '--data', 'cifar10-jpeg75', '--limit', '50',
                     '--json']) == 0
    command = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {k: command[k] for k in result} == result
    assert result['top5_err'] < result['top1_err'] < 50


def test_onnx_without_runtime_module_is_a_clear_error(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec',
                        lambda name, *a: None if name == 'sd_zoo.deploy.onnx_runtime' else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match='sd_zoo.deploy.onnx_runtime'):
        eval_command._load_onnx('model.onnx', 'cpu')
