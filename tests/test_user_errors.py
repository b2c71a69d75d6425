"""Every user mistake ends in one line that names the problem and the fix, and exit code 2: no traceback.

The table lists each bad input, run through the ``sd-zoo`` entry point in this process (an unexpected
exception would surface here as a test error), with a piece of the one line it must print.
"""
import socket
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants as hf_constants

import sd_zoo  # noqa: F401  (registers the models)
from sd_zoo import checkpoint, cli, data, pretrained

HAVE_DATA = (data.data_root() / 'cifar10-jpeg75.tar.gz').exists()
HUB_FOLDER = pretrained.SHIPPED_DIR / 'sd_resnet20.c10j75'
TRAIN = ['train', '--model', 'sd_resnet20', '--data', 'cifar10-jpeg75', '--quiet']
EVAL = ['eval', '--data', 'cifar10-jpeg75']


def _cases(tmp: Path):
    """(label, argv, expected piece of the message)."""
    a_file = tmp / 'a_file'
    a_file.write_text('x')
    for name, content in (('empty', b''), ('garbage', b'not a checkpoint at all'), ('truncated', None)):
        run = tmp / f'resume_{name}'
        run.mkdir()
        if content is None:  # the first bytes of a real torch.save file
            torch.save({'model': torch.zeros(1000)}, run / 'checkpoint.pt')
            content = (run / 'checkpoint.pt').read_bytes()[:300]
        (run / 'checkpoint.pt').write_bytes(content)
    out = str(tmp / 'run')
    return [
        ('train: unknown model', ['train', '--model', 'sd_nope', '--data', 'cifar10-jpeg75', '--output', out],
         "unknown model 'sd_nope'; sd-zoo models: sd_resnet20"),
        ('train: unknown tag', ['train', '--model', 'sd_resnet20.nope', '--data', 'cifar10-jpeg75', '--output', out],
         'unknown pretrained tag sd_resnet20.nope; known tags: sd_resnet20.c10j75'),
        ('eval: unknown model', EVAL + ['--model', 'sd_nope'], "unknown model 'sd_nope'"),
        ('eval: unknown tag', EVAL + ['--model', 'sd_resnet20.nope'], 'known tags: sd_resnet20.c10j75'),
        ('schedule: unknown model', ['schedule', '--model', 'sd_nope', '-o', str(tmp / 's.png')], "unknown model"),
        ('train: batch size 0', TRAIN + ['--batch-size', '0', '--output', out], '--batch-size must be >= 1, got 0'),
        ('train: negative batch size', TRAIN + ['--batch-size', '-8', '--output', out], '--batch-size must be >= 1'),
        ('eval: batch size 0', EVAL + ['--model', 'sd_resnet20.c10j75', '--batch-size', '0'], '--batch-size must be >= 1'),
        ('train: negative lr', TRAIN + ['--lr', '-0.1', '--output', out], '--lr must be > 0, got -0.1'),
        ('train: negative threads', TRAIN + ['--num-threads', '-1', '--output', out], '--num-threads must be >= 1'),
        ('eval: negative threads', EVAL + ['--model', 'sd_resnet20.c10j75', '--num-threads', '-1'],
         '--num-threads must be >= 1'),
        ('eval: mc-samples 0', EVAL + ['--model', 'sd_resnet20.c10j75', '--mc-samples', '0'], 'depth samples must be a positive integer, got 0'),
        ('train: epochs 0', TRAIN + ['--epochs', '0', '--output', out], '--epochs must be >= 1, got 0'),
        ('train: eval-every 0', TRAIN + ['--eval-every', '0', '--output', out], '--eval-every must be >= 1, got 0'),
        ('train: train-subset 0', TRAIN + ['--train-subset', '0', '--output', out], '--train-subset must be >= 1'),
        ('train: max-steps -1', TRAIN + ['--max-steps', '-1', '--output', out], '--max-steps must be >= 1'),
        ('eval: negative limit', EVAL + ['--model', 'sd_resnet20.c10j75', '--limit', '-5'], '--limit must be >= 0'),
        ('train: cuda without a GPU', TRAIN + ['--device', 'cuda', '--output', out], 'has no CUDA GPU'),
        ('train: unknown device', TRAIN + ['--device', 'banana', '--output', out], "unknown device 'banana'"),
        ('eval: cuda without a GPU', EVAL + ['--model', 'sd_resnet20.c10j75', '--device', 'cuda'], 'has no CUDA GPU'),
        ('train: resume without a checkpoint', TRAIN + ['--resume', '--output', str(tmp / 'nothing_here')],
         'holds no checkpoint.pt to resume from'),
        ('train: resume an empty checkpoint', TRAIN + ['--resume', '--output', str(tmp / 'resume_empty')],
         'checkpoint.pt is unreadable'),
        ('train: resume a garbage checkpoint', TRAIN + ['--resume', '--output', str(tmp / 'resume_garbage')],
         'checkpoint.pt is unreadable'),
        ('train: resume a truncated checkpoint', TRAIN + ['--resume', '--output', str(tmp / 'resume_truncated')],
         'checkpoint.pt is unreadable'),
        ('train: unwritable output', TRAIN + ['--epochs', '1', '--output', str(a_file / 'run')],
         'cannot write to --output'),
        ('train: pretrained and init-weights', TRAIN + ['--pretrained', '--init-weights', 'w.safetensors',
                                                        '--output', out], 'not both'),
        ('export: unwritable output', ['export', '--model', 'sd_resnet20', '-o', str(a_file / 'm.onnx')],
         'cannot write'),
        ('export: a tag without weights to load', ['export', '--model', 'sd_resnet20.c10j75', '-o', str(tmp / 'm.onnx')],
         'names published weights: add --pretrained'),
        ('plot: a missing run', ['plot', str(tmp / 'no_run'), '-o', str(tmp / 'p.png')], 'holds no finished epoch'),
        ('prune-curve: data of another class count',
         ['prune-curve', '--model', 'sd_resnet20.c10j75', '--data', 'cifar100-jpeg75', '--quiet'],
         'has 10 classes but cifar100-jpeg75 has 100; give the data the model was trained for'),
        ('hub push without network', ['hub', 'push', str(HUB_FOLDER), '--repo-id', 'sd-zoo/test', '--token', 'x'],
         'could not push'),
    ]


def _needs_data(label: str) -> bool:
    # These reach the point where the test set is read before the mistake is found.
    return label.startswith('eval: batch') or 'unwritable output' in label and label.startswith('train')


@pytest.fixture
def offline_hub(monkeypatch):
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    monkeypatch.setattr(hf_constants, 'ENDPOINT', f'http://127.0.0.1:{port}')
    monkeypatch.setenv('HF_HUB_DISABLE_XET', '1')


def test_every_user_mistake_ends_in_one_line_and_exit_code_2(tmp_path, capsys, offline_hub):
    failures = []
    for label, argv, expected in _cases(tmp_path):
        if _needs_data(label) and not HAVE_DATA:
            continue
        code = cli.main(argv)
        err = capsys.readouterr().err.strip()
        lines = [line for line in err.splitlines() if line.strip()]
        if code != 2 or len(lines) != 1 or expected not in lines[0] or 'Traceback' in err:
            failures.append(f'{label}: exit {code}, stderr {err!r}')
    assert not failures, '\n'.join(failures)
    assert not (tmp_path / 'run').exists()  # no failed train left an output folder behind


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(sd_zoo.SDZooError, match='unknown model'):
        cli.main(['--debug', 'train', '--model', 'sd_nope', '--data', 'cifar10-jpeg75', '--output', str(tmp_path)])


def test_weights_with_flipped_tensor_bytes_are_refused_by_eval_and_export(tmp_path, capsys):
    model = sd_zoo.load_model('sd_resnet20', pretrained=False)
    path = checkpoint.save_weights(model, tmp_path / 'w.safetensors', 'sd_resnet20', data='cifar10-jpeg75')
    raw = bytearray(path.read_bytes())
    raw[-3000] ^= 0x20  # inside the tensor data: the header (and so the metadata) still reads
    path.write_bytes(bytes(raw))
    for argv in (EVAL + ['--checkpoint', str(path)], ['export', '--checkpoint', str(path), '-o', str(tmp_path / 'm.onnx')]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert f'{path} is corrupt: its tensors digest to' in err and 'but the file records' in err, err
    assert not (tmp_path / 'm.onnx').exists()


def test_missing_onnx_runtime_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'onnxruntime', None)  # what `import onnxruntime` meets when it is absent
    assert cli.main(['prune-curve', '--model', 'sd_resnet20.c10j75', '--data', 'cifar10-jpeg75', '--quiet']) == 2
    err = capsys.readouterr().err
    assert 'ONNX Runtime is not installed: pip install "sd-zoo[onnx]"' in err and 'Traceback' not in err
