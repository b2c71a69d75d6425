"""The progress of a training run: epochs done, best validation error and the time left, from its files."""
import json

from sd_zoo import cli
from sd_zoo.training.progress import estimate, quiet_epoch_time, run_progress


def _row(epoch, seconds, val_err):
    return dict(epoch=epoch, epoch_time_s=seconds, val_err=val_err)


def test_the_time_left_uses_the_fastest_quarter_of_epochs_so_far():
    # Epochs slowed several-fold while other work shared the machine (900 s, 300 s) must not inflate it.
    times = [100, 900, 110, 120, 105, 300, 100, 130]
    rows = [_row(i + 1, t, 50 - i) for i, t in enumerate(times)]
    p = estimate(rows, epochs=20, finished=False)
    assert quiet_epoch_time(times) == 100  # the fastest 2 of 8
    assert p['quiet_epoch_time_s'] == 100 and p['median_epoch_time_s'] == 115 and p['quiet_since_epoch'] == 1
    assert p['epochs_done'] == 8 and p['estimated_time_left_s'] == 12 * 100
    assert (p['best_val_err'], p['best_val_epoch']) == (43, 8)
    assert quiet_epoch_time([7.0]) == 7.0 and quiet_epoch_time([4, 2, 9, 8, 6]) == 3  # ceil(5 / 4) = 2 epochs


def test_best_validation_skips_epochs_without_evaluation_and_a_finished_run_has_no_time_left():
    rows = [_row(1, 10, None), _row(2, 10, 30.0), _row(3, 10, None), _row(4, 10, 31.0)]
    p = estimate(rows, epochs=4, finished=True)
    assert (p['best_val_err'], p['best_val_epoch'], p['estimated_time_left_s']) == (30.0, 2, 0)
    empty = estimate([], epochs=4, finished=False)
    assert empty['epochs_done'] == 0 and empty['estimated_time_left_s'] is None and empty['best_val_err'] is None


def test_sd_zoo_progress_reads_a_run_folder(tmp_path, capsys):
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'run.json').write_text(json.dumps(dict(config=dict(epochs=10))))
    (run / 'metrics.jsonl').write_text(''.join(json.dumps(_row(e, 60.0, 40.0 - e)) + '\n' for e in (1, 2))
                                       + '{"epoch": 3, "epoch_ti')  # a row cut short by a crash is not counted
    assert cli.main(['progress', str(run)]) == 0
    assert capsys.readouterr().out == (f'{run}: epoch 2 of 10, best validation error 38.00 % (epoch 2), 60 s per '
                                       f'epoch (median; fastest quarter 60 s), about 0.1 h left\n')
    assert cli.main(['progress', str(run), '--json']) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == run_progress(run) and printed['estimated_time_left_s'] == 8 * 60
    assert printed['resume'] == f'sd-zoo train --resume --output {run}'
    (run / 'summary.json').write_text('{}')
    assert run_progress(run)['finished'] and run_progress(run)['estimated_time_left_s'] == 0
    assert cli.main(['progress', str(run)]) == 0 and '(finished)' in capsys.readouterr().out


def test_a_run_resumed_on_other_hardware_estimates_the_time_left_from_its_latest_part(tmp_path, capsys):
    run = tmp_path / 'run'
    run.mkdir()
    # Epochs 1-4 on a machine with native bf16 (100 s), then resumed on one without it (800 s).
    parts = [dict(first_epoch=1, amp='bf16'), dict(first_epoch=5, amp='none')]
    (run / 'run.json').write_text(json.dumps(dict(config=dict(epochs=10), parts=parts)))
    (run / 'metrics.jsonl').write_text(''.join(json.dumps(_row(e, t, 50.0 - e)) + '\n' for e, t in
                                               ((1, 100.0), (2, 100.0), (3, 100.0), (4, 100.0), (5, 800.0))))
    p = run_progress(run)
    assert p['quiet_epoch_time_s'] == 800 and p['estimated_time_left_s'] == 5 * 800
    assert p['median_epoch_time_s'] == 100 and p['quiet_since_epoch'] == 5  # the median is of the whole run
    # The line names the epochs the fastest quarter is of, which here is slower than the run's median.
    assert cli.main(['progress', str(run)]) == 0
    assert ('100 s per epoch (median; fastest quarter 800 s, of the epochs since the resume at epoch 5), '
            'about 1.1 h left') in capsys.readouterr().out
    # Before the latest part has finished an epoch, the earlier parts are all there is to go on.
    before = estimate([_row(e, 100.0, 50.0) for e in (1, 2)], 10, False, part_start=3)
    assert before['estimated_time_left_s'] == 800 and before['quiet_since_epoch'] == 1
