"""bf16 autocast and channels_last in training: which precision the trainer chooses, what stays fp32, and
that bf16 trains like fp32 on real data."""
import json

import pytest
import torch

import sd_zoo  # noqa: F401  (registers the models)
import timm
from sd_zoo.training import train

from conftest import need_data

CPU = torch.device('cpu')


@pytest.mark.parametrize('native, amp, chosen', [
    ('avx512_bf16', 'auto', 'bf16'), (None, 'auto', 'none'), (None, 'bf16', 'bf16'), ('AMX', 'none', 'none'),
    ('AMX', 'bf16', 'bf16')])
def test_auto_takes_bf16_only_where_it_is_native_and_an_explicit_choice_is_honoured(monkeypatch, native, amp, chosen):
    monkeypatch.setattr(train, 'native_bf16', lambda device: native)
    used, why = train.choose_precision(amp, CPU)
    assert used == chosen
    assert why.startswith('precision: ') and '\n' not in why
    if amp == 'auto' and not native:
        assert 'emulated' in why
    if amp == 'bf16' and not native:
        assert 'slower' in why  # an explicit bf16 on an emulating CPU is honoured, with a warning
    if chosen == 'bf16' and native:
        assert f'({native} computes bf16 natively)' in why


def test_an_explicit_bf16_names_the_native_hardware_as_auto_does(monkeypatch):
    monkeypatch.setattr(train, 'native_bf16', lambda device: 'AMX')
    assert train.choose_precision('bf16', CPU) == train.choose_precision('auto', CPU)


def test_native_bf16_reads_the_cpu_features(monkeypatch):
    monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: False)
    monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: True)
    assert train.native_bf16(CPU) == 'avx512_bf16'
    monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: False)
    assert train.native_bf16(CPU) is None


def test_under_bf16_autocast_batchnorm_statistics_and_the_loss_stay_fp32():
    torch.manual_seed(0)
    model = timm.create_model('sd_resnet20', drop_path_rate=0.0).train().to(memory_format=torch.channels_last)
    bn = model.bn1
    seen = {}
    bn.register_forward_hook(lambda m, inputs, output: seen.update(x=inputs[0].detach(), y=output))
    x = torch.randn(64, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (64,))
    loss, logits = train.train_step(model, train.build_optimizer(model, train.resolve_config(
        dict(recipe='paper', output='-'))), x, y, label_smoothing=0.1, use_amp=True)
    assert seen['x'].dtype == torch.bfloat16 and logits.dtype == torch.bfloat16  # autocast really ran
    assert loss.dtype == torch.float32
    assert bn.running_mean.dtype == bn.running_var.dtype == bn.weight.dtype == torch.float32
    # The batch mean of the bf16 input, accumulated in float64: bf16 accumulation would be off by ~1e-3.
    batch_mean = seen['x'].double().mean(dim=(0, 2, 3))
    torch.testing.assert_close(bn.running_mean.double(), bn.momentum * batch_mean, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_fifty_steps_in_bf16_end_with_the_loss_of_fp32(tmp_path):
    """The same 50 steps of sd_resnet20 (same weights, data order and gates) on real data, fp32 against bf16.

    Measured on a Zen 4 CPU: mean training loss 2.1619 (fp32) and 2.1622 (bf16), from ln 10 = 2.30 at the start;
    the tolerance of 0.02 is 60 times that difference and a tenth of the distance travelled.
    """
    need_data()
    results = {}
    for amp in ('none', 'bf16'):
        out = tmp_path / amp
        summary = train.train(dict(
            model='sd_resnet20', data='cifar10-jpeg75', recipe='fast', epochs=1, batch_size=128, lr=0.1,
            warmup_epochs=0.2, train_subset=50 * 128, val_size=1000, test_subset=500, amp=amp, channels_last=True,
            seed=0, quiet=True, output=str(out)))
        assert summary['steps'] == 50 and summary['config']['amp'] == amp
        row = json.loads((out / 'metrics.jsonl').read_text().splitlines()[-1])
        results[amp] = row
    fp32, bf16 = results['none'], results['bf16']
    assert fp32['train_loss'] < 2.25 and bf16['train_loss'] < 2.25  # both trained
    assert abs(bf16['train_loss'] - fp32['train_loss']) < 0.02, (fp32['train_loss'], bf16['train_loss'])
    assert bf16['val_err'] < 85 and fp32['val_err'] < 85  # chance is 90 %


@pytest.mark.parametrize('amp', ['auto', 'none'])
def test_auto_is_chosen_again_when_a_run_resumes_on_other_hardware_and_each_part_is_recorded(tmp_path, monkeypatch,
                                                                                              amp):
    """``auto`` means "bf16 where it is native": a run started where bf16 is emulated goes on in bf16 on a
    machine that computes it natively. An explicit choice holds for the whole run."""
    need_data('cifar10-jpeg75')
    out = tmp_path / 'run'
    cfg = dict(model='sd_resnet20', data='cifar10-jpeg75', recipe='fast', train_subset=128, val_size=64,
               test_subset=100, epochs=3, batch_size=64, num_threads=1, quiet=True, amp=amp, output=str(out))
    used = []
    real_step = train.train_step
    monkeypatch.setattr(train, 'train_step', lambda *a: used.append(a[-1]) or real_step(*a))
    real_write = train.atomic_write

    def write_then_stop(path, write):  # the run stops once epoch 1 of 3 is saved
        real_write(path, write)
        if path.name == 'checkpoint.pt':
            raise KeyboardInterrupt
    monkeypatch.setattr(train, 'atomic_write', write_then_stop)
    monkeypatch.setattr(train, 'native_bf16', lambda device: None)
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg)
    monkeypatch.setattr(train, 'atomic_write', real_write)
    monkeypatch.setattr(train, 'native_bf16', lambda device: 'AMX')
    summary = train.train(dict(output=str(out), resume=True, quiet=True))
    assert summary['config']['amp'] == amp and summary['final_epoch'] == 3
    parts = json.loads((out / 'run.json').read_text())['parts']
    assert [p['first_epoch'] for p in parts] == [1, 2]
    if amp == 'auto':
        assert used == [False] * 2 + [True] * 4  # 2 steps per epoch
        assert [p['amp'] for p in parts] == ['none', 'bf16']
        assert 'emulated' in parts[0]['precision'] and '(AMX computes bf16 natively)' in parts[1]['precision']
    else:
        assert used == [False] * 6 and [p['amp'] for p in parts] == ['none', 'none']
    assert torch.load(out / 'checkpoint.pt', weights_only=True)['parts'] == parts
