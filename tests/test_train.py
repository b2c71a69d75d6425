"""The trainer: recipes and lr schedules, outputs, bit-exact resume after SIGKILL, DDP agreement, and the
parts of timm's train.py that sd-zoo models must support."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import sd_zoo  # noqa: F401  (registers the models)
import timm
import timm.data
import timm.optim
from sd_zoo import data
from sd_zoo.training import train
from sd_zoo.training.progress import run_progress
from sd_zoo.errors import ConfigError
from sd_zoo import load_model
from sd_zoo.weights.checkpoint import read_metadata
from sd_zoo.evaluation.evaluate import evaluate, model_logits_fn

from conftest import need_data

REPO = Path(__file__).resolve().parents[1]
TINY = dict(model='sd_resnet20', data='cifar10-jpeg75', train_subset=128, val_size=64, test_subset=100,
            epochs=2, batch_size=32, num_threads=1, quiet=True)


@pytest.fixture(scope='module')
def jpeg_data():
    need_data('cifar10-jpeg75')
    data.load_split('cifar10-jpeg75', 'train')  # decode once, before any subprocess needs the cache


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS='1')
    return [sys.executable, '-m', 'sd_zoo.cli', *args], env


# --- recipes and schedules ---------------------------------------------------------------------------

def test_recipes_are_defaults_that_flags_override():
    cfg = train.resolve_config(dict(recipe='paper', output='x'))
    assert (cfg['lr'], cfg['batch_size'], cfg['epochs'], cfg['weight_decay']) == (0.1, 128, 500, 1e-4)
    assert cfg['nesterov'] and cfg['momentum'] == 0.9 and cfg['milestones'] == (0.5, 0.75)
    cfg = train.resolve_config(dict(recipe='fast', output='x', lr=0.2, epochs=None))
    assert cfg['lr'] == 0.2 and cfg['epochs'] == train.RECIPES['fast']['epochs']
    with pytest.raises(ConfigError, match='unknown recipe'):
        train.resolve_config(dict(recipe='slow', output='x'))
    with pytest.raises(ConfigError, match='unknown training settings: lrr'):
        train.resolve_config(dict(output='x', lrr=0.1))
    with pytest.raises(ConfigError, match='--output'):
        train.resolve_config({})


def test_paper_schedule_divides_lr_at_half_and_three_quarters():
    cfg = train.resolve_config(dict(recipe='paper', output='x'))
    spe, total = 351, 500 * 351
    assert train.lr_at(0, total, spe, cfg) == pytest.approx(0.1)
    assert train.lr_at(250 * spe - 1, total, spe, cfg) == pytest.approx(0.1)
    assert train.lr_at(250 * spe, total, spe, cfg) == pytest.approx(0.01)
    assert train.lr_at(375 * spe, total, spe, cfg) == pytest.approx(0.001)
    # --epochs rescales the milestones.
    assert train.lr_at(50 * spe, 100 * spe, spe, cfg) == pytest.approx(0.01)


def test_fast_schedule_warms_up_then_decays_to_zero():
    cfg = train.resolve_config(dict(recipe='fast', output='x'))
    spe, total = 10, 600
    lrs = [train.lr_at(s, total, spe, cfg) for s in range(total)]
    assert lrs[0] == pytest.approx(cfg['lr'] / 20) and lrs[19] == pytest.approx(cfg['lr'])
    assert all(a >= b for a, b in zip(lrs[19:], lrs[20:])) and lrs[-1] < cfg['lr'] / 500


def test_optimizer_excludes_norm_and_bias_from_decay_only_when_asked():
    model = timm.create_model('sd_resnet20')
    fast = train.build_optimizer(model, train.resolve_config(dict(recipe='fast', output='x')))
    decayed, plain = fast.param_groups
    assert decayed['weight_decay'] == 5e-4 and plain['weight_decay'] == 0
    assert all(p.ndim > 1 for p in decayed['params']) and all(p.ndim == 1 for p in plain['params'])
    paper = train.build_optimizer(model, train.resolve_config(dict(recipe='paper', output='x')))
    assert len(paper.param_groups) == 1 and paper.param_groups[0]['nesterov']


# --- a full in-process run ---------------------------------------------------------------------------

@pytest.fixture(scope='module')
def runs(jpeg_data, tmp_path_factory):
    root = tmp_path_factory.mktemp('runs')
    # The constant-depth run also exercises the fast recipe (warm-up, label smoothing, no decay on BN/bias).
    summaries = {name: train.train(dict(TINY, output=root / name, drop_path_rate=rate, recipe=recipe))
                 for name, rate, recipe in (('sd', 0.5, 'paper'), ('const', 0.0, 'fast'))}
    return root, summaries


def test_run_writes_all_outputs(runs):
    root, summaries = runs
    out = root / 'sd'
    for name in ('final.safetensors', 'best.safetensors', 'metrics.jsonl', 'summary.json', 'run.json',
                 'progress.json', 'curves.png', 'checkpoint.pt'):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in rows] == [1, 2]
    for key in ('train_loss', 'train_err', 'val_err', 'test_err', 'lr', 'epoch_time_s', 'images_per_s',
                'blocks_executed_measured', 'blocks_expected'):
        assert rows[-1][key] is not None, key
    model = timm.create_model('sd_resnet20', drop_path_rate=0.5)
    assert rows[0]['blocks_expected'] == pytest.approx(model.expected_depth)
    assert 0 < rows[0]['blocks_executed_measured'] <= model.num_blocks
    summary = json.loads((out / 'summary.json').read_text())
    assert summary == json.loads(json.dumps(summaries['sd']))
    # The trainer's progress, from what it holds, is what sd-zoo progress reads back from the files.
    assert json.loads((out / 'progress.json').read_text()) == json.loads(json.dumps(run_progress(out)))
    best = summary['best_val_epoch']
    assert summary['test_err_at_best_val'] == rows[best - 1]['test_err']
    assert summary['final_test_err'] == rows[-1]['test_err']
    with safe_open(str(out / 'final.safetensors'), 'pt') as f:
        meta = f.metadata()
    assert meta['sd_zoo.model'] == 'sd_resnet20' and meta['sd_zoo.data'] == 'cifar10-jpeg75'
    assert meta['sd_zoo.recipe'] == 'paper' and meta['sd_zoo.num_classes'] == '10'
    assert json.loads(meta['sd_zoo.model_args']) == model.sd_config()


def test_constant_depth_executes_every_block(runs):
    root, _ = runs
    rows = [json.loads(line) for line in (root / 'const' / 'metrics.jsonl').read_text().splitlines()]
    assert all(r['blocks_executed_measured'] == r['blocks_expected'] == 9 for r in rows)
    assert read_metadata(root / 'const' / 'final.safetensors')['recipe'] == 'fast'


def test_plot_of_two_runs(runs, tmp_path):
    from sd_zoo.evaluation.metrics_plot import plot_runs, run_label
    root, _ = runs
    assert 'constant depth' in run_label(root / 'const') and 'p_L = 0.5' in run_label(root / 'sd')
    png = plot_runs([root / 'sd', root / 'const'], tmp_path / 'fig.png')
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_a_run_tested_only_at_the_end_is_drawn_by_its_validation_error():
    from sd_zoo.evaluation.metrics_plot import error_curve
    per_epoch = [dict(epoch=e, val_err=30.0 - e, test_err=31.0 - e) for e in (1, 2, 3)]
    assert error_curve(per_epoch) == ('test', [1, 2, 3], [30.0, 29.0, 28.0])
    at_end = [dict(epoch=e, val_err=30.0 - e, test_err=None) for e in (1, 2)] + [dict(epoch=3, val_err=27.0,
                                                                                     test_err=28.5)]
    assert error_curve(at_end) == ('val', [1, 2, 3], [29.0, 28.0, 27.0])  # not one lone test point


def test_refuses_to_overwrite_or_resume_with_other_settings(runs):
    root, _ = runs
    run = root / 'sd'
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(ConfigError, match='already holds a run'):
        train.train(dict(TINY, output=run))
    # Settings not given come from the run's record; each given one that disagrees is named.
    with pytest.raises(ConfigError, match=r"other settings: --lr 0.05 differs from the run's 0.1, --recipe fast "
                                          r"differs from the run's paper; leave them out"):
        train.train(dict(output=run, resume=True, lr=0.05, recipe='fast'))
    with pytest.raises(ConfigError, match=r"other settings: --train-subset 64 differs from the run's 128;"):
        train.train(dict(TINY, output=run, resume=True, train_subset=64, num_threads=2, eval_every=2))
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # refused resumes leave the run as it was


def test_checkpoint_loads_with_weights_only(runs):
    ckpt = torch.load(runs[0] / 'sd' / 'checkpoint.pt', weights_only=True)
    assert ckpt['epoch'] == 2 and ckpt['step'] == 2 * 128 // 32
    assert {'torch', 'gate'} <= set(ckpt['rng'])


# --- resume after SIGKILL ----------------------------------------------------------------------------

def _tensors(path):
    return load_file(str(path))


def _untimed_metrics(path):
    return [{k: v for k, v in json.loads(line).items() if k not in ('epoch_time_s', 'images_per_s')}
            for line in path.read_text().splitlines()]


def test_resume_after_sigkill_is_bit_exact(jpeg_data, tmp_path):
    args = ['train', '--model', 'sd_resnet20', '--data', 'cifar10-jpeg75', '--train-subset', '768',
            '--val-size', '128', '--test-subset', '100', '--epochs', '3', '--batch-size', '64', '--seed', '7',
            '--num-threads', '1', '--quiet']
    cmd, env = _cli(*args, '--output', str(tmp_path / 'ref'))
    subprocess.run(cmd, env=env, check=True, timeout=300)

    cmd, env = _cli(*args, '--output', str(tmp_path / 'run'))
    proc = subprocess.Popen(cmd, env=env)
    ckpt, metrics = tmp_path / 'run' / 'checkpoint.pt', tmp_path / 'run' / 'metrics.jsonl'
    deadline = time.time() + 240
    while not ckpt.exists():  # written once epoch 1 is done
        assert proc.poll() is None and time.time() < deadline, 'training ended before its first checkpoint'
        time.sleep(0.05)
    epoch_time = json.loads(metrics.read_text().splitlines()[0])['epoch_time_s']
    time.sleep(epoch_time / 2)  # half-way through epoch 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert torch.load(ckpt, weights_only=True)['epoch'] == 1, 'the kill came after epoch 2 had finished'
    assert not (tmp_path / 'run' / 'final.safetensors').exists()
    progress = json.loads((tmp_path / 'run' / 'progress.json').read_text())  # written with epoch 1's metrics
    assert (progress['epochs_done'], progress['epochs'], progress['finished']) == (1, 3, False)
    assert progress['estimated_time_left_s'] == round(2 * epoch_time)
    assert progress['resume'] == f"sd-zoo train --resume --output {tmp_path / 'run'}"

    # No other flag: the run's checkpoint supplies its settings.
    cmd, env = _cli('train', '--output', str(tmp_path / 'run'), '--resume')
    subprocess.run(cmd, env=env, check=True, timeout=300)
    for name in ('final.safetensors', 'best.safetensors'):
        ref, got = _tensors(tmp_path / 'ref' / name), _tensors(tmp_path / 'run' / name)
        assert ref.keys() == got.keys()
        for k in ref:
            assert torch.equal(ref[k], got[k]), f'{name}: {k} differs after resume'
    assert _untimed_metrics(tmp_path / 'ref' / 'metrics.jsonl') == _untimed_metrics(metrics)
    progress = json.loads((tmp_path / 'run' / 'progress.json').read_text())
    assert (progress['epochs_done'], progress['finished'], progress['estimated_time_left_s']) == (3, True, 0)
    assert 'resume' not in progress
    run_json = json.loads((tmp_path / 'run' / 'run.json').read_text())
    assert run_json['commands'][1:] == [shlex.join(['sd-zoo', 'train', '--output', str(tmp_path / 'run'), '--resume'])]


# --- DDP ---------------------------------------------------------------------------------------------

def test_ddp_two_processes_agree_on_gates_and_weights(jpeg_data, tmp_path):
    dump = tmp_path / 'dump'
    cmd, env = _cli('train', '--model', 'sd_resnet20', '--data', 'cifar10-jpeg75', '--train-subset', '256',
                    '--val-size', '64', '--test-subset', '100', '--epochs', '1', '--batch-size', '64',
                    '--max-steps', '3', '--num-threads', '1', '--quiet', '--output', str(tmp_path / 'run'),
                    '--debug-dump', str(dump))
    cmd = cmd[:1] + ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2'] + cmd[1:]
    subprocess.run(cmd, env=env, check=True, timeout=300)
    ranks = [json.loads((dump / f'rank{r}.json').read_text()) for r in range(2)]
    assert [r['world_size'] for r in ranks] == [2, 2]
    assert len(ranks[0]['gates']) == 3 and ranks[0]['gates'] == ranks[1]['gates']
    assert not all(all(step) for step in ranks[0]['gates']), 'p_L = 0.5 should have dropped some block'
    assert ranks[0]['params'] == ranks[1]['params']
    # Evaluation was split across ranks and summed: it must match a single-process evaluation.
    model = load_model(tmp_path / 'run' / 'final.safetensors')
    x, y = data.load_split('cifar10-jpeg75', 'test')
    idx = data.balanced_subset(y, np.arange(len(y)), 100)
    single = evaluate(model_logits_fn(model, data.CIFAR10_MEAN, data.CIFAR10_STD), x[idx], y[idx])
    row = json.loads((tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()[-1])
    assert row['test_err'] == pytest.approx(single['top1_err'])


# --- timm train.py contract --------------------------------------------------------------------------

def test_timm_train_py_create_model_kwargs():
    model = timm.create_model(
        'sd_resnet110', pretrained=False, num_classes=10, drop_rate=0.0, drop_path_rate=0.5, drop_block_rate=None,
        global_pool=None, bn_momentum=None, bn_eps=None, scriptable=False, checkpoint_path=None)
    assert model.num_blocks == 54 and model.survival_probs[-1] == pytest.approx(0.5)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_timm_resolve_data_config():
    cfg = timm.data.resolve_data_config({}, model=timm.create_model('sd_resnet110'))
    assert cfg['input_size'] == (3, 32, 32) and cfg['crop_pct'] == 1.0
    assert cfg['mean'] == pytest.approx(data.CIFAR10_MEAN) and cfg['std'] == pytest.approx(data.CIFAR10_STD)


def test_timm_create_optimizer_v2():
    model = timm.create_model('sd_resnet20')
    opt = timm.optim.create_optimizer_v2(model, 'sgd', lr=0.1, weight_decay=1e-4, momentum=0.9)
    by_decay = {g['weight_decay']: g['params'] for g in opt.param_groups}
    assert set(by_decay) == {0.0, 1e-4}
    assert all(p.ndim <= 1 for p in by_decay[0.0]) and all(p.ndim > 1 for p in by_decay[1e-4])
    assert sum(len(g['params']) for g in opt.param_groups) == len(list(model.parameters()))
    model.train()
    torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.arange(4)).backward()
    opt.step()


# --- no lost or mislabelled work ---------------------------------------------------------------------

def test_a_second_run_into_a_locked_output_is_refused(jpeg_data, tmp_path):
    out = tmp_path / 'run'
    lock = train._take_output(out)  # this process plays the run in progress
    try:
        cmd, env = _cli('train', '--model', 'sd_resnet20', '--data', 'cifar10-jpeg75', '--epochs', '1',
                        '--train-subset', '128', '--val-size', '64', '--quiet', '--output', str(out))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and f'is in use by another sd-zoo train (pid {os.getpid()})' in proc.stderr
        assert sorted(p.name for p in out.iterdir()) == ['.lock']  # nothing written by the refused run
    finally:
        lock.close()
    # a lock left by a process that died is no lock: the kernel dropped it with the process
    (out / '.lock').write_text('999999')
    (out / '.final.safetensors.4242.tmp').write_bytes(b'half a file')
    train._take_output(out).close()
    assert sorted(p.name for p in out.iterdir()) == ['.lock']  # the killed writer's temp file is gone


def test_a_tag_trains_with_its_own_settings_and_says_so(jpeg_data, tmp_path, capsys):
    summary = train.train(dict(TINY, model='sd_resnet20.c10j75_cd', epochs=1, quiet=False, max_steps=1,
                               output=tmp_path / 'cd'))
    out = capsys.readouterr().out
    assert summary['model_args']['drop_path_rate'] == 0.0  # the tag's constant depth, not the paper's 0.5
    assert 'settings of tag c10j75_cd, not its weights' in out and "'drop_path_rate': 0.0" in out
    assert read_metadata(tmp_path / 'cd' / 'final.safetensors')['init_from'] == 'random initialisation'


def test_fine_tuning_starts_from_the_tags_weights_with_a_new_head(tmp_path):
    cfg = train.resolve_config(dict(model='sd_resnet20.c10j75', pretrained=True, output=str(tmp_path)))
    model = train.create_model(cfg, num_classes=100, say=lambda *a: None)
    published = load_model('sd_resnet20.c10j75')
    assert model.fc.out_features == 100 and model.sd_config() == published.sd_config()
    own = model.state_dict()
    for k, v in published.state_dict().items():
        if not k.startswith('fc.'):
            assert torch.equal(own[k], v), k


def test_init_weights_are_recorded_in_the_new_weights(jpeg_data, tmp_path):
    start = load_model('sd_resnet20.c10j75')
    path = tmp_path / 'start.safetensors'
    from sd_zoo.weights.checkpoint import save_weights
    save_weights(start, path, data='cifar10-jpeg75')
    train.train(dict(TINY, epochs=1, max_steps=1, init_weights=str(path), output=tmp_path / 'ft'))
    meta = read_metadata(tmp_path / 'ft' / 'final.safetensors')
    assert meta['init_from'] == 'start.safetensors'
    assert json.loads((tmp_path / 'ft' / 'run.json').read_text())['init_from'] == 'start.safetensors'


# --- the paper's protocol: test only at the end --------------------------------------------------------

def test_test_at_end_scores_the_best_and_final_weights_as_per_epoch_testing_does(jpeg_data, tmp_path, monkeypatch):
    from sd_zoo.evaluation.evaluate import evaluate_model

    cfg = dict(TINY, epochs=3, seed=3, lr=0.05, output=str(tmp_path / 'every'))
    every = train.train(cfg)
    at_end = train.train(dict(cfg, test_at_end=True, output=str(tmp_path / 'end')))
    rows = [json.loads(line) for line in (tmp_path / 'end' / 'metrics.jsonl').read_text().splitlines()]
    assert [r['test_err'] is None for r in rows] == [True, True, False]  # one test pass, after the last epoch
    assert [r['val_err'] for r in rows] == [json.loads(line)['val_err'] for line in
                                            (tmp_path / 'every' / 'metrics.jsonl').read_text().splitlines()]
    for key in ('best_val_epoch', 'test_err_at_best_val', 'final_test_err'):
        assert at_end[key] == every[key], key
    for name, key in (('best.safetensors', 'test_err_at_best_val'), ('final.safetensors', 'final_test_err')):
        measured = evaluate_model(load_model(tmp_path / 'end' / name), 'cifar10-jpeg75', limit=TINY['test_subset'])
        assert measured['top1_err'] == pytest.approx(at_end[key], abs=1e-9), name

    # Interrupted after epoch 2 and resumed: the best-validation weights travel in the checkpoint.
    real_write, writes = train.atomic_write, []

    def write_then_stop(path, write):
        real_write(path, write)
        writes.append(path.name)
        if writes.count('checkpoint.pt') == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(train, 'atomic_write', write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train.train(dict(cfg, test_at_end=True, output=str(tmp_path / 'resumed')))
    monkeypatch.setattr(train, 'atomic_write', real_write)
    resumed = train.train(dict(output=str(tmp_path / 'resumed'), resume=True, quiet=True))
    for key in ('best_val_epoch', 'test_err_at_best_val', 'final_test_err'):
        assert resumed[key] == at_end[key], key
