"""Every user mistake ends in one line that names the problem and the fix, and exit code 2: no traceback.

The table lists each bad input, run through the ``sd-zoo`` entry point in this process (an unexpected
exception would surface here as a test error), with a piece of the one line it must print.
"""
import shutil
import socket
import sys
from pathlib import Path

import onnx
import pytest
import torch
from huggingface_hub import constants as hf_constants
from onnx import TensorProto, helper

import sd_zoo  # noqa: F401  (registers the models)
from sd_zoo.weights import checkpoint, pretrained
from sd_zoo import cli, data
from sd_zoo.training import train

from conftest import have_data
from sd_zoo.errors import InputShapeError
from sd_zoo.evaluation.evaluate import model_logits_fn
from sd_zoo.files import set_onnx_metadata, sha256_file
from sd_zoo.deploy.onnx_runtime import OnnxClassifier, normalize_uint8

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
    needs_pandas = tmp / 'inference.py'
    needs_pandas.write_text('import sd_zoo_absent_package.io\n')
    return [
        ('train: unknown model', ['train', '--model', 'sd_nope', '--data', 'cifar10-jpeg75', '--output', out],
         "unknown model 'sd_nope'; sd-zoo models: sd_resnet20"),
        ('train: unknown tag', ['train', '--model', 'sd_resnet20.nope', '--data', 'cifar10-jpeg75', '--output', out],
         'unknown pretrained tag sd_resnet20.nope; known tags: sd_resnet20.c10, '),
        ('eval: unknown model', EVAL + ['--model', 'sd_nope'], "unknown model 'sd_nope'"),
        ('eval: unknown tag', EVAL + ['--model', 'sd_resnet20.nope'], 'known tags: sd_resnet20.c10, '),
        ('schedule: unknown model', ['schedule', '--model', 'sd_nope', '-o', str(tmp / 's.png')], "unknown model"),
        ('train: batch size 0', TRAIN + ['--batch-size', '0', '--output', out], '--batch-size must be >= 1, got 0'),
        ('train: negative batch size', TRAIN + ['--batch-size', '-8', '--output', out], '--batch-size must be >= 1'),
        ('eval: batch size 0', EVAL + ['--model', 'sd_resnet20.c10j75', '--batch-size', '0'], '--batch-size must be >= 1'),
        ('train: negative lr', TRAIN + ['--lr', '-0.1', '--output', out], '--lr must be > 0, got -0.1'),
        ('train: negative threads', TRAIN + ['--num-threads', '-1', '--output', out], '--num-threads must be >= 1'),
        ('eval: negative threads', EVAL + ['--model', 'sd_resnet20.c10j75', '--num-threads', '-1'],
         '--num-threads must be >= 1'),
        ('eval: mc-samples 0', EVAL + ['--model', 'sd_resnet20.c10j75', '--mc-samples', '0'], '--mc-samples must be >= 1, got 0'),
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
        ('progress: not a run folder', ['progress', str(tmp / 'no_run')], 'has no run.json: give the --output folder'),
        ('prune-curve: a depth the model cannot have',
         ['prune-curve', '--model', 'sd_resnet20', '--data', 'cifar10-jpeg75', '--blocks', '9,2', '--quiet'],
         'blocks [2]: sd_resnet20 keeps between 3 (one per stage) and 9 blocks'),
        ('prune-curve: a block count below one', ['prune-curve', '--model', 'sd_resnet20', '--data', 'cifar10',
                                                  '--blocks', '5,0'], '--blocks must be >= 1, got 0'),
        ('prune-curve: data of another class count',
         ['prune-curve', '--model', 'sd_resnet20.c10j75', '--data', 'cifar100-jpeg75', '--quiet'],
         'has 10 classes but cifar100-jpeg75 has 100; give the data the model was trained for'),
        ('prune-curve: neither models nor saved curves', ['prune-curve', '--data', 'cifar10'],
         'prune-curve needs --model TAG and --data NAME (or --replot FILE to redraw saved curves)'),
        ('prune-curve: replot and measure at once',
         ['prune-curve', '--replot', str(a_file), '--plot', str(tmp / 'c.png'), '--model', 'sd_resnet20'],
         'leave out --model and --data'),
        ('prune-curve: replot without --plot', ['prune-curve', '--replot', str(a_file)],
         '--replot needs --plot FILE, the PNG to write'),
        ('prune-curve: replot a missing file', ['prune-curve', '--replot', str(tmp / 'nosuch.json'), '--plot',
                                                str(tmp / 'c.png')], 'cannot read --replot'),
        ('prune-curve: replot a file that is not its output', ['prune-curve', '--replot', str(a_file), '--plot',
                                                               str(tmp / 'c.png')],
         'holds no prune-curve results; give the output of `sd-zoo prune-curve --json`'),
        ('hub push without network', ['hub', 'push', str(HUB_FOLDER), '--repo-id', 'sd-zoo/test', '--token', 'x'],
         'could not push'),
        # issue 19 part 4: publishing and timm's scripts
        ('timm: a script needs a package nothing installed', ['timm', str(needs_pandas)],
         "inference.py needs the Python package 'sd_zoo_absent_package', which is not installed: pip install "
         "sd_zoo_absent_package"),
        # issue 19 part 3: resume
        ('train: a new run without --data', ['train', '--output', out], 'a new run needs --data, one of cifar10,'),
        ('train: resume without --output', ['train', '--resume'], 'an output directory is required (--output DIR)'),
        ('train: resume with flags the run disagrees with',
         ['train', '--resume', '--output', _recorded_run(tmp), '--lr', '0.2', '--seed', '3', '--quiet'],
         "--lr 0.2 differs from the run's 0.1, --seed 3 differs from the run's 0; leave them out"),
        ('train: a time budget that fits no epoch', TRAIN + ['--time-budget', '0.01', '--train-subset', '128',
                                                             '--batch-size', '32', '--output', out],
         '--time-budget 0.01 fits no epoch'),
        # issue 19 part 1: demo and numeric flags
        ('demo: weights that do not exist', ['demo', '--weights', str(tmp / 'nosuch_dir')],
         'nosuch_dir: no such file or folder; give a Hub folder'),
        ('demo: CIFAR-100 weights on the CIFAR-10 test set', ['demo', '--weights', _cifar100_weights(tmp)],
         'has 100 classes but cifar10-jpeg75 has 10; give the data the model was trained for'),
        ('demo: negative random', ['demo', '--random', '-3'], '--random must be >= 1, got -3'),
        ('demo: batch size 0', ['demo', '--batch-size', '0'], '--batch-size must be >= 1, got 0'),
        ('demo: negative limit', ['demo', '--limit', '-5'], '--limit must be >= 0, got -5'),
        ('demo: repeats 0', ['demo', '--repeats', '0'], '--repeats must be >= 1, got 0'),
        ('eval: CIFAR-100 weights on CIFAR-10', EVAL + ['--checkpoint', _cifar100_weights(tmp)],
         'has 100 classes but cifar10-jpeg75 has 10'),
        ('eval: negative seed', EVAL + ['--model', 'sd_resnet20.c10j75', '--mc-samples', '2', '--seed', '-1'],
         '--seed must be >= 0, got -1'),
        ('train: negative seed', TRAIN + ['--seed', '-1', '--output', out], '--seed must be >= 0, got -1'),
        ('train: momentum 1', TRAIN + ['--momentum', '1', '--output', out], '--momentum must be >= 0 and < 1, got 1.0'),
        ('train: lr nan', TRAIN + ['--lr', 'nan', '--output', out], '--lr must be a finite number, got nan'),
        ('train: a milestone past the end', TRAIN + ['--milestones', '0.5', '1.5', '--output', out],
         '--milestones must be >= 0 and <= 1, got 1.5'),
        ('train: drop-path rate above 1', TRAIN + ['--drop-path-rate', '1.5', '--output', out],
         '--drop-path-rate must be >= 0 and <= 1, got 1.5'),
        ('export: batch 0', ['export', '--model', 'sd_resnet20', '-o', str(tmp / 'm.onnx'), '--batch', '0'],
         '--batch must be >= 1, got 0'),
        ('export: negative keep-blocks', ['export', '--model', 'sd_resnet20', '-o', str(tmp / 'm.onnx'),
                                          '--keep-blocks', '-1'], '--keep-blocks must be >= 1, got -1'),
        ('export: calibration-images 0', ['export', '--model', 'sd_resnet20', '-o', str(tmp / 'm.onnx'), '--int8',
                                          '--calibration', 'cifar10-jpeg75', '--calibration-images', '0'],
         '--calibration-images must be >= 1, got 0'),
        ('export: int8 settings without --int8', ['export', '--model', 'sd_resnet20', '-o', str(tmp / 'm.onnx'),
                                                  '--calibration-images', '64', '--int8-weight-bits', '8'],
         '--calibration-images and --int8-weight-bits apply to int8 quantization only: add --int8'),
        ('export: int8 weight bits 6', ['export', '--model', 'sd_resnet20', '-o', str(tmp / 'm.onnx'), '--int8',
                                        '--calibration', 'cifar10-jpeg75', '--int8-weight-bits', '6'],
         '--int8-weight-bits must be >= 7 and <= 8, got 6'),
        ('validate: negative limit', ['validate', str(tmp / 'm.onnx'), '--limit', '-1'],
         '--limit must be >= 0, got -1'),
        ('validate: batch size 0', ['validate', str(tmp / 'm.onnx'), '--batch-size', '0'],
         '--batch-size must be >= 1, got 0'),
        ('prune-curve: threads 0', ['prune-curve', '--model', 'sd_resnet20.c10j75', '--data', 'cifar10-jpeg75',
                                    '--threads', '0'], '--threads must be >= 1, got 0'),
        ('hub build: negative pruning rows', ['hub', 'build', '--run', str(tmp), '--pruning-rows', '-1'],
         '--pruning-rows must be >= 0, got -1'),
        ('hub check: negative limit', ['hub', 'check', '--limit', '-1'], '--limit must be >= 0, got -1'),
        ('schedule: drop-path rate above 1', ['schedule', '--model', 'sd_resnet20', '-o', str(tmp / 's.png'),
                                              '--drop-path-rate', '1.5'], '--drop-path-rate must be >= 0 and <= 1'),
        # issue 19 part 2: names that tell the truth
        ('eval: a published tag named for other weights',
         EVAL + ['--model', HUB_FOLDER.name, '--checkpoint', _own(tmp)],
         f'--model {HUB_FOLDER.name} names the published weights of that tag (sha256 {_published_sha256()[:12]}), '
         f'but {_own(tmp)} holds others (sha256 '),
        ('export: a published tag named for other weights',
         ['export', '--model', HUB_FOLDER.name, '--checkpoint', _own(tmp), '-o', str(tmp / 'm.onnx')],
         f'--model {HUB_FOLDER.name} names the published weights of that tag'),
        ('eval: a tag without published weights named for a file',
         EVAL + ['--model', 'sd_resnet20.c10', '--checkpoint', _own(tmp)],
         '--model sd_resnet20.c10 names published weights, but that tag has none'),
        ('eval: an ONNX file named as other weights',
         EVAL + ['--onnx', str(tmp / 'm.onnx'), '--model', HUB_FOLDER.name],
         '--onnx scores the ONNX file alone: drop --model and --checkpoint'),
        ('hub check: a folder outside hub_configs named as a published tag, with other weights',
         ['hub', 'check', _impostor(tmp), '--skip-eval'], '1 hub folder(s) failed the check'),
        ('hub push --dry-run: a folder outside hub_configs named as a published tag, with other weights',
         ['hub', 'push', _impostor(tmp), '--repo-id', f'sd-zoo/{HUB_FOLDER.name}', '--dry-run'],
         f'the file has {sha256_file(Path(_impostor(tmp)) / "model.safetensors")}: not the published weights of '
         f'{HUB_FOLDER.name}'),
        # What argparse itself refuses: one line too, not its usage block.
        ('an unknown command', ['trian'], "invalid choice: 'trian' (choose from 'train', "),
        ('an unknown hub command', ['hub', 'frob'], "sd-zoo hub: error: argument HUB_COMMAND: invalid choice: 'frob'"),
        ('train: an unknown --amp', TRAIN + ['--amp', 'fp8', '--output', out],
         "argument --amp: invalid choice: 'fp8' (choose from 'none', 'bf16', 'auto') (see sd-zoo train --help)"),
        ('export: a word for a number', ['export', '--model', 'sd_resnet20', '-o', str(tmp / 'm.onnx'),
                                         '--opset', 'abc'], "argument --opset: invalid int value: 'abc'"),
        ('eval: a required flag left out', ['eval', '--model', 'sd_resnet20.c10j75'],
         'the following arguments are required: --data (see sd-zoo eval --help)'),
        ('hub build: a required flag left out', ['hub', 'build'], 'sd-zoo hub build: error: the following arguments'),
    ]


def _published_sha256() -> str:
    return pretrained.load_manifest()[HUB_FOLDER.name]['sha256']


def _own(tmp: Path) -> str:
    """Fresh sd_resnet20 weights with the settings of the published tag: not its published weights."""
    path = tmp / 'own.safetensors'
    if not path.exists():
        checkpoint.save_weights(sd_zoo.load_model('sd_resnet20', pretrained=False), path, 'sd_resnet20',
                                data='cifar10-jpeg75')
    return str(path)


def _impostor(tmp: Path) -> str:
    """A copy of the shipped folder of a published tag, outside hub_configs/, holding other weights."""
    folder = tmp / 'elsewhere' / HUB_FOLDER.name
    if not folder.exists():
        shutil.copytree(HUB_FOLDER, folder)
        shutil.copyfile(_own(tmp), folder / 'model.safetensors')
    return str(folder)


def _cifar100_weights(tmp: Path) -> str:
    """An sd_resnet20 weights file trained (so its metadata says) on CIFAR-100."""
    path = tmp / 'c100.safetensors'
    if not path.exists():
        model = sd_zoo.load_model('sd_resnet20', pretrained=False, num_classes=100)
        checkpoint.save_weights(model, path, 'sd_resnet20', data='cifar100-jpeg75')
    return str(path)


def _recorded_run(tmp: Path) -> str:
    """A run folder whose checkpoint records sd_resnet20 trained with the paper recipe (lr 0.1, seed 0)."""
    run = tmp / 'recorded'
    run.mkdir()
    config = train.resolve_config(dict(model='sd_resnet20', data='cifar10-jpeg75', output=str(run)))
    torch.save(dict(model={}, optimizer={}, config=config, epoch=1), run / 'checkpoint.pt')
    return str(run)


def _needs_data(label: str) -> bool:
    # These reach the point where the test set is read before the mistake is found.
    return (label.startswith('eval: batch') or 'unwritable output' in label and label.startswith('train')
            or 'time budget' in label)


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
        if _needs_data(label) and not have_data():
            continue
        code = cli.main(argv)
        err = capsys.readouterr().err.strip()
        lines = [line for line in err.splitlines() if line.strip()]
        if code != 2 or len(lines) != 1 or expected not in lines[0] or 'Traceback' in err:
            failures.append(f'{label}: exit {code}, stderr {err!r}')
    assert not failures, '\n'.join(failures)
    assert not (tmp_path / 'run').exists()  # no failed train left an output folder behind


def _tiny_onnx(tmp: Path) -> Path:
    """An ONNX "classifier" of (N, 3, 32, 32) input with sd-zoo's normalisation metadata: pool and flatten."""
    nodes = [helper.make_node('GlobalAveragePool', ['x'], ['p']), helper.make_node('Flatten', ['p'], ['y'])]
    graph = helper.make_graph(nodes, 'g', [helper.make_tensor_value_info('x', TensorProto.FLOAT, ['N', 3, 32, 32])],
                              [helper.make_tensor_value_info('y', TensorProto.FLOAT, ['N', 3])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 18)])
    set_onnx_metadata(proto, dict(mean=list(data.CIFAR10_MEAN), std=list(data.CIFAR10_STD)))
    onnx.save(proto, tmp / 'tiny.onnx')
    return tmp / 'tiny.onnx'


def _input_cases(tmp: Path):
    """(label, call, expected piece of the message): inputs that are not what an input path takes."""
    model = sd_zoo.load_model('sd_resnet20', pretrained=False)
    clf = OnnxClassifier(_tiny_onnx(tmp))
    logits_fn = model_logits_fn(model, data.CIFAR10_MEAN, data.CIFAR10_STD)
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images[0, 0, 0] = 255
    nchw = images.permute(0, 3, 1, 2)
    normalized = data.normalize(images, data.CIFAR10_MEAN, data.CIFAR10_STD)
    return [
        ('model: uint8 images', lambda: model(images),
         'sd_resnet20 expects a normalised float tensor (N, 3, H, W), got uint8 of shape (2, 32, 32, 3)'),
        ('model: float images left in [0, 255]', lambda: model(nchw.float()),
         'sd_resnet20 takes float (N, C, H, W) normalised as (x / 255 - mean) / std, within about ±3, but this '
         'batch reaches 255: divide images in [0, 255] by 255'),
        ('model_logits_fn: a normalised float batch', lambda: logits_fn(normalized),
         'the logits function of sd_resnet20 takes uint8 images (N, H, W, C), RGB in [0, 255], got float32'),
        ('model_logits_fn: channels-first uint8 images', lambda: logits_fn(nchw),
         'got shape (2, 3, 32, 32) (channels first? uint8 images are channels-last'),
        ('OnnxClassifier: float images left in [0, 255]', lambda: clf(nchw.float().numpy()),
         'tiny.onnx takes float (N, C, H, W) normalised as (x / 255 - mean) / std, within about ±3, but this '
         'batch reaches 255'),
        ('OnnxClassifier: int64 images', lambda: clf(images.long().numpy()),
         'tiny.onnx takes uint8 images (N, H, W, C), RGB in [0, 255] or float (N, C, H, W) normalised as '
         '(x / 255 - mean) / std, got int64'),
        ('OnnxClassifier: channels-first uint8 images', lambda: clf(nchw.numpy()),
         'tiny.onnx takes uint8 images (N, H, W, C), RGB in [0, 255] with C = 3, got shape (2, 3, 32, 32)'),
        ('OnnxClassifier: channels-last float', lambda: clf(normalized.permute(0, 2, 3, 1).numpy()),
         '(channels-last layout? transpose to NCHW, or pass uint8 NHWC images)'),
        ('normalize_uint8: float images', lambda: normalize_uint8(nchw.float().numpy(), (0.5,) * 3, (0.5,) * 3),
         'normalize_uint8 takes uint8 images (N, H, W, C), RGB in [0, 255], got float32'),
    ]


def test_every_input_that_an_input_path_does_not_take_is_one_line_saying_what_it_takes(tmp_path):
    # What they take passes, up to the extremes of normalised images: all-black and all-white.
    extremes = torch.stack([torch.zeros(32, 32, 3), torch.full((32, 32, 3), 255.0)]).to(torch.uint8)
    extremes = data.normalize(extremes, data.CIFAR10_MEAN, data.CIFAR10_STD)
    assert sd_zoo.load_model('sd_resnet20', pretrained=False)(extremes).shape == (2, 10)
    assert OnnxClassifier(_tiny_onnx(tmp_path))(extremes.numpy()).shape == (2, 3)
    failures = []
    for label, call, expected in _input_cases(tmp_path):
        try:
            call()
            failures.append(f'{label}: no error')
        except InputShapeError as e:
            if '\n' in str(e) or expected not in str(e):
                failures.append(f'{label}: {e}')
    assert not failures, '\n'.join(failures)


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
