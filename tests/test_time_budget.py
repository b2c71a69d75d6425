"""``sd-zoo train --time-budget``: the epoch arithmetic, the deadline, the probe's timer, and a budgeted run
that trains exactly like ``--epochs N`` with the N it chose."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sd_zoo import data
from sd_zoo.training import time_budget, train
from sd_zoo.errors import ConfigError
from sd_zoo.training.time_budget import Deadline, TAIL_S, epochs_cost, evaluations, plan_epochs, time_calls

from conftest import need_data

REPO = Path(__file__).resolve().parents[1]
TINY = dict(model='sd_resnet20', data='cifar10-jpeg75', recipe='fast', train_subset=128, val_size=64,
            test_subset=100, batch_size=32, lr=0.05, eval_batch_size=100, num_threads=1, quiet=True)


@pytest.fixture(scope='module')
def jpeg_data():
    need_data('cifar10-jpeg75')
    data.load_split('cifar10-jpeg75', 'train')  # decode once, outside any budget


# --- arithmetic -------------------------------------------------------------------------------------------

def test_evaluations_count_every_nth_epoch_and_the_last():
    assert evaluations(10, 1) == 10
    assert evaluations(10, 3) == 4   # epochs 3, 6, 9 and the last, 10
    assert evaluations(9, 3) == 3
    assert evaluations(1, 5) == 1
    assert epochs_cost(10, 9.0, 1.0, 3) == 10 * 9.0 + 4 * 1.0


@pytest.mark.parametrize('available, epoch_s, eval_s, every, cap', [
    (100.0, 9.0, 1.0, 1, 1000), (100.0, 9.0, 1.0, 3, 1000), (57.3, 0.7, 2.9, 2, 1000), (1e4, 0.01, 5.0, 1, 1000),
    (30.0, 1.0, 0.0, 1, 12), (5.0, 4.0, 2.0, 1, 10), (3.0, 4.0, 0.0, 1, 10), (-1.0, 1.0, 1.0, 1, 10)])
def test_plan_epochs_is_the_most_that_fits(available, epoch_s, eval_s, every, cap):
    epochs = plan_epochs(available, epoch_s, eval_s, every, cap)
    assert 0 <= epochs <= cap
    if epochs:
        assert epochs_cost(epochs, epoch_s, eval_s, every) <= available
    if epochs < cap:
        assert epochs_cost(epochs + 1, epoch_s, eval_s, every) > available


def test_plan_epochs_exact_values():
    assert plan_epochs(100.0, 9.0, 1.0, 1, 1000) == 10      # 10 * (9 + 1) = 100 fits exactly
    assert plan_epochs(100.0, 9.0, 1.0, 5, 1000) == 10      # 90 + 2 evaluations
    assert plan_epochs(100.0, 9.5, 1.0, 5, 1000) == 10      # 95 + 2 = 97
    assert plan_epochs(100.0, 9.9, 1.0, 5, 1000) == 9       # 10 would cost 101; 9 cost 89.1 + 2
    assert plan_epochs(100.0, 1.0, 0.0, 1, 60) == 60        # capped
    assert plan_epochs(5.0, 4.0, 2.0, 1, 10) == 0           # one epoch with its evaluation needs 6


def test_deadline_allows_an_epoch_only_if_it_and_two_evaluations_fit():
    d = Deadline(budget_s=100.0, started=0.0, epoch_s=10.0, eval_s=1.0)
    # Planned epoch 10 s, evaluations 1 s each, tail TAIL_S: the last start that fits.
    last_ok = 100.0 - 2 * 1.0 - 10.0 - TAIL_S
    assert d.fits_another(epoch_started=last_ok - 10.0, now=last_ok)
    assert not d.fits_another(epoch_started=last_ok - 10.0, now=last_ok + 0.01)
    # An epoch measured slower than planned counts as the next one's length.
    assert d.fits_another(epoch_started=30.0, now=60.0)                  # 60 + 2 + 30 + tail
    assert not d.fits_another(epoch_started=60.0 - 40.0, now=60.0)      # 60 + 2 + 40 + tail > 100


@pytest.fixture
def clock(monkeypatch):
    """A perf_counter that only the timed calls advance (``clock.tick(s)``): exact timings on a loaded machine."""
    class Clock:
        now = 100.0

        def tick(self, seconds):
            self.now += seconds
    c = Clock()
    monkeypatch.setattr(time_budget.time, 'perf_counter', lambda: c.now)
    return c


def test_time_calls_excludes_warmup_and_measures_the_mean(clock):
    calls = []

    def fn():
        calls.append(1)
        clock.tick(0.5 if len(calls) <= 2 else 0.01)  # two slow warm-up calls
    per_call, timed = time_calls(fn, warmup=2, min_calls=5, min_seconds=0.0)
    assert timed == 5 and len(calls) == 7
    assert per_call == pytest.approx(0.01)


def test_time_calls_runs_until_min_seconds(clock):
    per_call, timed = time_calls(lambda: clock.tick(0.03), warmup=0, min_calls=1, min_seconds=0.1)
    assert timed == 4 and per_call == pytest.approx(0.03)  # min_calls alone would have stopped after one call


def test_time_calls_syncs_before_every_clock_read(clock):
    events = []
    time_calls(lambda: events.append('call'), warmup=1, min_calls=2, sync=lambda: events.append('sync'))
    assert events == ['call', 'sync', 'call', 'sync', 'call', 'sync']


def test_process_age_reads_the_start_time_from_proc(monkeypatch):
    # Field 22 of /proc/self/stat, counted after the command name, which may hold spaces and parentheses.
    stat = '4242 (py (x) y) S ' + ' '.join(['1'] * 18) + ' 250000 ' + ' '.join(['0'] * 30)
    files = {'/proc/self/stat': stat, '/proc/uptime': '2512.75 9000.00\n'}
    monkeypatch.setattr(time_budget.Path, 'read_text', lambda self: files[str(self)])
    monkeypatch.setattr(time_budget.os, 'sysconf', lambda name: 100)  # clock ticks per second
    assert time_budget.process_age() == pytest.approx(2512.75 - 2500.0)
    files['/proc/uptime'] = 'garbled'
    assert time_budget.process_age() == 0.0


def test_process_age_counts_from_the_process_start():
    # time_budget.py loaded by path: this child does not import torch.
    code = (f'import importlib.util, time; s = importlib.util.spec_from_file_location("tb", '
            f'{str(REPO / "sd_zoo" / "training" / "time_budget.py")!r}); m = importlib.util.module_from_spec(s); '
            f's.loader.exec_module(m); time.sleep(0.5); print(m.process_age())')
    start = time.perf_counter()
    age = float(subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout)
    # No speed is assumed, so load cannot break it: the child sleeps 0.5 s before asking and lives within
    # this window. /proc counts in clock ticks (1/100 s): the slack is a few of them.
    assert 0.5 <= age <= time.perf_counter() - start + 5 / os.sysconf('SC_CLK_TCK')


def test_time_budget_must_be_positive():
    with pytest.raises(ConfigError, match='--time-budget must be > 0, got 0'):
        train.resolve_config(dict(output='x', time_budget=0))


# --- the trainer ------------------------------------------------------------------------------------------

def test_budgeted_run_trains_exactly_like_epochs_n(jpeg_data, tmp_path):
    budget = 16.0
    summary = train.train(dict(TINY, epochs=500, time_budget=budget, output=str(tmp_path / 'budget')))
    plan = summary['time_budget']
    chosen, ran = plan['epochs'], plan['epochs_run']
    # Epochs this short are noisy: the deadline may end the run early (what it is there for); the plan stands.
    assert 1 <= chosen < 500 and plan['planned_s'] <= budget and plan['wall_s'] <= budget
    assert 1 <= ran <= chosen and plan['stopped_early'] == (ran < chosen)
    run = json.loads((tmp_path / 'budget' / 'run.json').read_text())
    assert run['config']['epochs'] == summary['config']['epochs'] == run['time_budget']['epochs'] == chosen
    assert summary['final_epoch'] == ran
    # The fast recipe's 2 warm-up epochs of 500 scale with the schedule.
    cfg = summary['config']
    assert cfg['warmup_epochs'] == pytest.approx(2.0 * chosen / 500)
    # The linear schedule spans exactly the chosen epochs, whose last step has the lr that ends the decay.
    rows = [json.loads(line) for line in (tmp_path / 'budget' / 'metrics.jsonl').read_text().splitlines()]
    spe = rows[0]['step']
    total = chosen * spe
    assert rows[-1]['step'] == ran * spe
    assert rows[-1]['lr'] == pytest.approx(train.lr_at(ran * spe - 1, total, spe, cfg))
    warmup = round(cfg['warmup_epochs'] * spe)
    assert train.lr_at(total - 1, total, spe, cfg) == pytest.approx(cfg['lr'] / (total - warmup))

    # The same run with --epochs N (and the warm-up the budget gave it): the same weights, bit for bit.
    train.train(dict(TINY, epochs=chosen, warmup_epochs=cfg['warmup_epochs'], max_steps=ran * spe,
                     output=str(tmp_path / 'epochs')))
    a, b = (load_file(tmp_path / d / 'final.safetensors') for d in ('budget', 'epochs'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # --resume keeps the epochs and the plan of the run's first part (no second probe, no new choice);
    # other epochs or warm-up than first asked for are refused, not silently dropped.
    refused = ((dict(epochs=50), '--epochs 50 '), (dict(epochs=500, warmup_epochs=1.0), '--warmup-epochs 1.0 '))
    for changed, named in refused:
        with pytest.raises(ConfigError, match=named):
            train.train(dict(TINY, resume=True, output=str(tmp_path / 'budget'), **changed))
    resumed = train.train(dict(TINY, epochs=500, warmup_epochs=2.0, resume=True, output=str(tmp_path / 'budget')))
    assert resumed['config']['epochs'] == chosen and resumed['time_budget']['epochs'] == chosen
    run = json.loads((tmp_path / 'budget' / 'run.json').read_text())
    assert run['time_budget']['probe_steps'] == plan['probe_steps'] and len(run['commands']) == 2


def test_cli_refuses_a_budget_that_fits_no_epoch(jpeg_data, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS='1')
    args = ['--model', 'sd_resnet20', '--data', 'cifar10-jpeg75', '--train-subset', '128', '--val-size', '64',
            '--test-subset', '100', '--batch-size', '32', '--num-threads', '1', '--time-budget', '1',
            '--output', str(tmp_path / 'new' / 'r')]
    result = subprocess.run([sys.executable, '-m', 'sd_zoo.cli', 'train', *args], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in result.stderr
    assert lines[0].startswith('sd-zoo train: error: --time-budget 1 fits no epoch: set-up took ')
    assert 'give at least' in lines[0] and '--train-subset' in lines[0]
    assert not (tmp_path / 'new').exists()  # the refused run removed the folders it made, lock and all


def test_a_refused_budget_leaves_a_folder_it_did_not_make_as_it_was(jpeg_data, tmp_path):
    mine = tmp_path / 'mine'
    mine.mkdir()
    (mine / 'notes.txt').write_text('kept')
    with pytest.raises(ConfigError, match='--time-budget 0.01 fits no epoch'):
        train.train(dict(TINY, epochs=5, time_budget=0.01, output=str(mine)))
    assert sorted(p.name for p in mine.iterdir()) == ['notes.txt']
