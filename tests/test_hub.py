"""Hub folders: build from a run, load through the Hugging Face cache (registry name and hf-hub: name),
adapt on load, fail fast and clearly, check, push to a local stub of the Hub API, schedule plots.

Nothing here reaches a network: every test runs with a temporary Hugging Face cache and an endpoint on
127.0.0.1. Weights are a freshly initialised sd_resnet20 written into a temporary run folder.
"""
import contextlib
import hashlib
import json
import shutil
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch

import sd_zoo  # noqa: F401  (registers the models)
import timm
from huggingface_hub import constants as hf_constants
from sd_zoo.weights import checkpoint, pretrained
from sd_zoo import cli, data
from sd_zoo.publishing import hub
from sd_zoo.errors import ConfigError, WeightsError
from sd_zoo.models import tags
from sd_zoo.evaluation.evaluate import evaluate_model
from sd_zoo.publishing.model_card import PAPER_RESULTS, card_metrics, read_card
from sd_zoo.deploy.pruning import prune_blocks

from conftest import have_data, need_data
from hub_stub import HubStub

NAME = 'sd_resnet20.c10j75'
REAL_MANIFEST = pretrained.MANIFEST_PATH
LIMIT = 100  # class-balanced test images the builds evaluate on (when the data is present)


def make_run(folder: Path, drop_path_rate: float = 0.5, seed: int = 0) -> Path:
    """A run folder as ``sd-zoo train`` writes it, holding an untrained sd_resnet20 with non-trivial BN stats."""
    torch.manual_seed(seed)
    model = timm.create_model('sd_resnet20', drop_path_rate=drop_path_rate)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # eval-mode BN then differs from identity
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.bias.data.uniform_(-0.1, 0.1)
    folder.mkdir(parents=True)
    for f in ('best.safetensors', 'final.safetensors'):
        checkpoint.save_weights(model, folder / f, 'sd_resnet20', data='cifar10-jpeg75', recipe='paper')
    config = dict(model='sd_resnet20', data='cifar10-jpeg75', recipe='paper', epochs=2, batch_size=128, lr=0.1,
                  momentum=0.9, nesterov=True, weight_decay=1e-4, schedule='step', milestones=[0.5, 0.75],
                  drop_path_rate=drop_path_rate, seed=seed, val_size=5000, test_subset=None,
                  output=str(folder.resolve()))
    summary = dict(model='sd_resnet20', data='cifar10-jpeg75', recipe='paper', best_val_epoch=2, best_val_err=90.0,
                   test_err_at_best_val=90.0, final_epoch=2, final_test_err=90.0, total_time_s=30.0,
                   model_args=model.sd_config(), config=config)
    (folder / 'summary.json').write_text(json.dumps(summary))
    (folder / 'run.json').write_text(json.dumps(dict(
        commands=[f'sd-zoo train --model sd_resnet20 --data cifar10-jpeg75 --drop-path-rate {drop_path_rate} '
                  f'--output {folder.resolve()}'], config=config, world_size=1, device='cpu')))
    (folder / 'metrics.jsonl').write_text(json.dumps(dict(epoch=1, test_err=90.0)) + '\n')
    return folder


def build(run: Path, out: Path, **kwargs) -> Path:
    kwargs.setdefault('pruning_rows', 0)  # measured in its own test: it times ONNX Runtime
    evaluate = have_data()
    return hub.build(run, out=out, evaluate=evaluate, limit=LIMIT if evaluate else None, **kwargs)


def source_model(run: Path):
    return sd_zoo.load_model(run / 'best.safetensors')


@pytest.fixture(scope='module')
def built(tmp_path_factory):
    """(run folder, hub folder) of the default-settings weights, built once for the module."""
    root = tmp_path_factory.mktemp('hub')
    run = make_run(root / 'run')
    return run, build(run, root / 'hub_configs')


@pytest.fixture
def folder(built, tmp_path):
    """A private copy of the built hub folder, for tests that damage it."""
    return Path(shutil.copytree(built[1], tmp_path / NAME))


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return f'http://127.0.0.1:{s.getsockname()[1]}'  # nothing listens there once closed


def _point_hub_at(monkeypatch, url: str) -> None:
    """Send huggingface_hub's requests to ``url``: its API endpoint, and its file URLs, whose template it
    builds from the endpoint once, at import (patching the endpoint alone leaves downloads on huggingface.co)."""
    monkeypatch.setattr(hf_constants, 'ENDPOINT', url)
    monkeypatch.setattr(hf_constants, 'HUGGINGFACE_CO_URL_TEMPLATE', url + '/{repo_id}/resolve/{revision}/{filename}')


@pytest.fixture
def own_manifest(tmp_path, monkeypatch):
    """An empty published.json: test builds use published names, and hub check compares a folder of a
    published name with the record, which for the packaged manifest is the published bytes, not theirs."""
    path = tmp_path / 'published.json'
    monkeypatch.setattr(pretrained, 'MANIFEST_PATH', path)
    return path


@pytest.fixture
def hf_cache(tmp_path, monkeypatch, own_manifest):
    """An empty Hugging Face cache, offline mode, no token, an endpoint where nothing answers, no manifest."""
    cache = tmp_path / 'hf' / 'hub'
    for key, value in dict(HF_HOME=str(tmp_path / 'hf'), HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE='1').items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv('HF_TOKEN', raising=False)
    # huggingface_hub reads its environment once, at import: patch the module constants it consults.
    monkeypatch.setattr(hf_constants, 'HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', True)
    _point_hub_at(monkeypatch, _closed_port_url())
    return cache


def logits(model, seed: int = 1) -> torch.Tensor:
    x = torch.randn(4, model.in_chans, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)


# --- build ---------------------------------------------------------------------------------------------

def test_build_writes_the_timm_layout_and_a_complete_card(built):
    run, folder = built
    assert sorted(p.name for p in folder.iterdir()) == sorted(hub.REQUIRED_FILES)  # safetensors only, no .bin
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == 'sd_resnet20' and config['num_classes'] == 10
    assert config['pretrained_cfg']['tag'] == 'c10j75' and config['pretrained_cfg']['input_size'] == [3, 32, 32]
    assert {k: config['model_args'][k] for k in ('drop_path_rate', 'sd_schedule', 'sd_gate', 'sd_rule')} == \
        dict(drop_path_rate=0.5, sd_schedule='linear', sd_gate='batch', sd_rule='paper')
    assert config['label_names'][:2] == ['airplane', 'automobile']
    meta = checkpoint.read_metadata(folder / 'model.safetensors')
    assert meta['model'] == 'sd_resnet20' and meta['data'] == 'cifar10-jpeg75' and meta['tag'] == 'c10j75'

    card = read_card(folder / 'README.md')
    front = card.data.to_dict()
    assert front['library_name'] == 'timm' and front['license'] == 'apache-2.0'
    assert {'image-classification', 'timm', 'stochastic-depth'} <= set(front['tags'])
    assert front['datasets'] == ['cifar10']
    result = front['model-index'][0]['results'][0]
    assert result['task']['type'] == 'image-classification' and result['dataset']['name'] == 'CIFAR-10 (JPEG-75 copy)'
    metrics = card_metrics(card)
    assert metrics['accuracy'] == pytest.approx(100 - metrics['top1_error'])
    sha = hashlib.sha256((folder / 'model.safetensors').read_bytes()).hexdigest()
    assert front['sd_zoo']['weights_sha256'] == sha and sha in card.text
    text = card.text
    for needle in ('CIFAR-10 (JPEG-75 copy)', 'not comparable', 'import sd_zoo', "timm.create_model('hf-hub:sd-zoo/"
                   f"{NAME}', pretrained=True)", '@inproceedings{huang2016deep', 'apache-2.0', '0.270 M',
                   '40.6 M multiply-accumulates', '(survival_schedule.png)', 'sd-zoo hub seed-cache',
                   'sd-zoo train --model sd_resnet20 --data cifar10-jpeg75'):
        assert needle in text, needle
    for row in PAPER_RESULTS:
        assert f"| {row['model']} (paper) | {row['data']} | {row['constant']:.2f} | {row['stochastic']:.2f} |" in text
    assert str(run.resolve()) not in text  # the card shows no machine-specific path
    assert (folder / 'survival_schedule.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_constant_depth_weights_get_the_cd_tag_and_load_as_constant_depth(tmp_path, hf_cache):
    run = make_run(tmp_path / 'run_cd', drop_path_rate=0.0)
    folder = build(run, tmp_path / 'out')
    assert folder.name == 'sd_resnet20.c10j75_cd'
    assert 'with **constant depth**' in (folder / 'README.md').read_text()
    hub.seed_cache([folder])
    model = timm.create_model('sd_resnet20.c10j75_cd', pretrained=True)
    assert model.sd_config()['drop_path_rate'] == 0.0
    torch.testing.assert_close(logits(model), logits(source_model(run)), rtol=0, atol=0)
    with pytest.raises(ConfigError, match=r"trained with \{'drop_path_rate': 0.0.*builds \{'drop_path_rate': 0.5"):
        hub.build(run, out=tmp_path / 'out2', tag='c10j75', evaluate=False)


def test_the_tag_table_is_the_one_source_of_tag_meanings():
    for name in timm.list_pretrained('sd_*'):
        arch, tag = name.split('.')
        info = tags.TAGS[tag]
        model = timm.create_model(name)
        assert {k: model.sd_config()[k] for k in info.model_args} == info.model_args
        cfg = model.pretrained_cfg
        assert (cfg['num_classes'], tuple(cfg['mean']), tuple(cfg['std'])) == (info.num_classes, info.mean, info.std)
        if info.data in data.DATASETS:  # the statistics of the data the weights are trained on, written once
            assert tuple(cfg['mean']) == data.DATASETS[info.data].mean
    constant = [n for n in timm.list_pretrained('sd_*') if timm.create_model(n).expected_depth ==
                timm.create_model(n).num_blocks]
    assert 'sd_resnet20.c10j75_cd' in constant and all(n.endswith('_cd') for n in constant)
    assert tags.tag_for('cifar10-jpeg75', dict(drop_path_rate=0.0)) == 'c10j75_cd'
    assert tags.tag_for('cifar100-jpeg75', dict(drop_path_rate=0.5)) == 'c100j75'
    with pytest.raises(ConfigError, match='no pretrained tag means weights trained on cifar10-jpeg75'):
        tags.tag_for('cifar10-jpeg75', dict(drop_path_rate=0.3))


def test_build_records_the_weights_in_a_manifest(built, tmp_path):
    manifest = tmp_path / 'published.json'
    folder = hub.build(built[0], out=tmp_path / 'out', evaluate=False, manifest=manifest)
    entry = json.loads(manifest.read_text())[NAME]
    assert entry['sha256'] == hub.sha256_file(folder / 'model.safetensors')
    assert entry['model_args'] == dict(drop_path_rate=0.5, sd_schedule='linear', sd_gate='batch', sd_rule='paper',
                                       sd_shortcut_pool=1)
    assert entry['top1_err'] == pytest.approx(90.0)  # the run's own number: built without evaluation
    assert pretrained.load_manifest(manifest) == json.loads(manifest.read_text())
    with pytest.raises(ConfigError, match='already exists; pass --force'):
        hub.build(built[0], out=tmp_path / 'out', evaluate=False, manifest=manifest)
    assert hub.build(built[0], out=tmp_path / 'out', evaluate=False, manifest=manifest, force=True) == folder


def test_the_card_shows_a_pruning_table_measured_at_build_time(built, tmp_path, own_manifest):
    need_data()
    folder = build(built[0], tmp_path / 'out', pruning_rows=3)
    text = (folder / 'README.md').read_text()
    assert '## Pick your speed: depth pruning' in text
    rows = [line for line in text.splitlines() if line.startswith('| ') and ' of 9 |' in line]
    assert [r.split(' of 9 |')[0].strip('| ') for r in rows] == ['9', '6', '3']
    # all blocks kept is the card's own error, measured on the same images
    assert rows[0].split('|')[2].strip() == f"{card_metrics(read_card(folder / 'README.md'))['top1_error']:.2f} %"
    # every row scores its own pruned net (these three score differently, so a row of the full net would show)
    model = source_model(built[0])
    errors = [evaluate_model(prune_blocks(model, n), 'cifar10-jpeg75', limit=LIMIT)['top1_err'] for n in (9, 6, 3)]
    assert [r.split('|')[2].strip() for r in rows] == [f'{e:.2f} %' for e in errors] and len(set(errors)) == 3
    assert hub.check(folder, evaluate=False) == []


def test_build_refuses_a_run_without_a_finished_epoch(tmp_path):
    run = make_run(tmp_path / 'run')
    summary = json.loads((run / 'summary.json').read_text())
    (run / 'summary.json').write_text(json.dumps(dict(summary, final_epoch=None)))
    with pytest.raises(ConfigError, match='finished no epoch'):
        hub.build(run, out=tmp_path / 'out', evaluate=False)
    assert not (tmp_path / 'out').exists()


# --- loading through the Hugging Face cache ------------------------------------------------------------

@pytest.mark.parametrize('name', [NAME, f'hf-hub:sd-zoo/{NAME}'])
def test_round_trip_through_the_cache_gives_the_same_logits(built, hf_cache, name):
    run, folder = built
    (snapshot,) = hub.seed_cache([folder])
    assert snapshot.parent.parent.name == f'models--sd-zoo--{NAME}'
    assert (hf_cache / f'models--sd-zoo--{NAME}' / 'refs' / 'main').read_text() == snapshot.name
    model = timm.create_model(name, pretrained=True)
    torch.testing.assert_close(logits(model), logits(source_model(run)), rtol=0, atol=0)
    assert pretrained.create_pretrained(name).pretrained_cfg['tag'] == 'c10j75'
    assert hub.seed_cache([folder]) == [snapshot]  # reseeding is idempotent


def test_weights_whose_settings_no_tag_means_are_refused_and_need_their_own_tag(tmp_path):
    run = make_run(tmp_path / 'run', drop_path_rate=0.3, seed=3)
    with pytest.raises(ConfigError, match='no pretrained tag means'):
        hub.build(run, out=tmp_path / 'out', evaluate=False)
    with pytest.raises(ConfigError, match='give them a tag that means their settings'):
        hub.build(run, out=tmp_path / 'out', tag='c10j75', evaluate=False)
    assert not (tmp_path / 'out').exists()


def test_config_json_model_args_rebuild_the_network_through_hf_hub(tmp_path, hf_cache):
    run = make_run(tmp_path / 'run', drop_path_rate=0.0, seed=3)
    folder = build(run, tmp_path / 'out')
    stored = json.loads((folder / 'config.json').read_text())['model_args']
    assert {k: stored[k] for k in source_model(run).sd_config()} == source_model(run).sd_config()
    hub.seed_cache([folder])
    model = timm.create_model('hf-hub:sd-zoo/sd_resnet20.c10j75_cd', pretrained=True)
    assert model.sd_config()['drop_path_rate'] == 0.0
    torch.testing.assert_close(logits(model), logits(source_model(run)), rtol=0, atol=0)


def test_num_classes_change_reinitialises_the_head_only(built, hf_cache):
    run, folder = built
    hub.seed_cache([folder])
    source = source_model(run).state_dict()
    model = timm.create_model(NAME, pretrained=True, num_classes=7)
    assert model.fc.weight.shape == (7, 64)
    for k, v in model.state_dict().items():
        if not k.startswith('fc.'):
            torch.testing.assert_close(v, source[k], rtol=0, atol=0)


def test_in_chans_change_adapts_the_first_conv(built, hf_cache):
    run, folder = built
    hub.seed_cache([folder])
    source = source_model(run).state_dict()
    model = timm.create_model(f'hf-hub:sd-zoo/{NAME}', pretrained=True, in_chans=1)
    torch.testing.assert_close(model.conv1.weight, source['conv1.weight'].sum(1, keepdim=True))
    torch.testing.assert_close(model.fc.weight, source['fc.weight'], rtol=0, atol=0)
    assert logits(model).shape == (4, 10)


def test_corrupt_safetensors_fails_with_advice(folder, hf_cache):
    (folder / 'model.safetensors').write_bytes(b'{"not": "safetensors"}' * 10)
    assert any('not a readable safetensors file' in p for p in hub.check(folder, evaluate=False))
    with pytest.raises(WeightsError, match='not a readable safetensors file'):
        hub.seed_cache([folder])
    with pytest.raises(WeightsError, match='not a readable safetensors file.*re-download'):
        timm.create_model(f'local-dir:{folder}', pretrained=True)


def test_corrupt_cached_weights_fail_with_advice(built, hf_cache):
    (snapshot,) = hub.seed_cache([built[1]])
    blob = (snapshot / 'model.safetensors').resolve()
    blob.write_bytes(blob.read_bytes()[:1000])  # a download cut short
    with pytest.raises(WeightsError, match='cached weights of .* fail their check.*not a readable safetensors file'):
        timm.create_model(NAME, pretrained=True)


def test_flipped_bits_in_cached_weights_are_caught_by_the_blob_digest(built, hf_cache):
    (snapshot,) = hub.seed_cache([built[1]])
    blob = (snapshot / 'model.safetensors').resolve()
    raw = bytearray(blob.read_bytes())
    raw[len(raw) - 5000] ^= 0x04  # a flipped bit in the tensor data; the header still parses
    blob.write_bytes(bytes(raw))
    with pytest.raises(WeightsError, match=f'its sha256 is [0-9a-f]{{64}}, but {blob.name} was recorded'):
        timm.create_model(NAME, pretrained=True)


def test_seed_cache_refuses_a_folder_that_fails_check(folder, hf_cache):
    raw = bytearray((folder / 'model.safetensors').read_bytes())
    raw[-5000] ^= 0x04
    (folder / 'model.safetensors').write_bytes(bytes(raw))
    assert any('is corrupt: its tensors digest to' in p for p in hub.check(folder, evaluate=False))
    with pytest.raises(WeightsError, match='fails `sd-zoo hub check`, so it is not cached.*is corrupt'):
        hub.seed_cache([folder])
    assert not hf_cache.exists() or not any(hf_cache.iterdir())


def test_unknown_architecture_in_config_json(folder):
    config = json.loads((folder / 'config.json').read_text())
    config['architecture'] = 'sd_resnet9000'
    (folder / 'config.json').write_text(json.dumps(config))
    (problem,) = [p for p in hub.check(folder, evaluate=False) if 'architecture' in p]
    assert "'sd_resnet9000' is not a registered timm model" in problem
    with pytest.raises(RuntimeError, match='Unknown model'):
        timm.create_model(f'local-dir:{folder}', pretrained=True)


def test_missing_files_are_named(folder, hf_cache):
    (folder / 'README.md').unlink()
    (folder / 'model.safetensors').unlink()
    problems = hub.check(folder, evaluate=False)
    assert 'missing file model.safetensors' in problems and 'missing file README.md' in problems
    with pytest.raises(WeightsError, match='missing file model.safetensors; missing file README.md'):
        hub.seed_cache([folder])
    with pytest.raises(WeightsError, match='has no model.safetensors'):
        timm.create_model(f'local-dir:{folder}', pretrained=True)


def test_pickle_weights_are_refused(folder, tmp_path, hf_cache):
    state = checkpoint.load_state_dict(folder / 'model.safetensors')
    pth = tmp_path / 'weights.pth'
    torch.save(state, pth)
    with pytest.raises(WeightsError, match='pickle-based.*safetensors only'):
        timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(pth)))
    # the same weights as a safetensors file load
    overlay = dict(file=str(folder / 'model.safetensors'))
    model = timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=overlay)
    torch.testing.assert_close(model.fc.weight, state['fc.weight'], rtol=0, atol=0)
    (folder / 'model.safetensors').rename(folder / 'pytorch_model.bin')  # timm would torch.load this one
    with pytest.raises(WeightsError, match='safetensors weights only'):
        timm.create_model(f'local-dir:{folder}', pretrained=True)
    assert any('pickle weights are not shipped' in p for p in hub.check(folder, evaluate=False))


# --- failing fast without network ----------------------------------------------------------------------

@pytest.fixture
def requests_sent(monkeypatch):
    """'METHOD host:port/path' of every HTTP request huggingface_hub sends, answered or not: a retry shows as a
    repeat. The behaviour, not the seconds, is asserted here (benchmarks/bench_hub_fail_fast.py times it)."""
    import httpx2  # huggingface_hub's HTTP client

    sent = []
    real = httpx2.Client.send

    def send(self, request, *args, **kwargs):
        sent.append(f'{request.method} {request.url.host}:{request.url.port}{request.url.path}')
        return real(self, request, *args, **kwargs)
    monkeypatch.setattr(httpx2.Client, 'send', send)
    return sent


def _file_requests(sent):
    """The requests for files of a repo (not the API calls huggingface_hub makes for itself)."""
    return [r for r in sent if '/resolve/' in r]


def _assert_clear_failure(fn):
    with pytest.raises(WeightsError) as info:
        fn()
    assert 'HF_HUB_OFFLINE' in str(info.value) and 'sd-zoo hub seed-cache' in str(info.value)
    assert 'pretrained_cfg_overlay=dict(file=' in str(info.value)
    return str(info.value)


@pytest.mark.parametrize('name, probed', [(NAME, 'model.safetensors'), (f'hf-hub:sd-zoo/{NAME}', 'config.json')])
def test_nothing_cached_and_no_hub_fails_after_one_attempt(hf_cache, monkeypatch, requests_sent, name, probed):
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', False)  # online, but the endpoint refuses connections
    pretrained.write_manifest_entry(NAME, dict(sha256='0' * 64))  # published, not cached
    message = _assert_clear_failure(lambda: pretrained.create_pretrained(name))
    assert 'cannot reach the Hugging Face Hub' in message
    # One HEAD to the endpoint set, not retried (huggingface_hub's back-off would spend about 25 s)
    port = urlsplit(hf_constants.ENDPOINT).port
    assert _file_requests(requests_sent) == [f'HEAD 127.0.0.1:{port}/sd-zoo/{NAME}/resolve/main/{probed}']


def test_an_unresponsive_hub_costs_one_timeout_not_a_minute_of_retries(hf_cache, monkeypatch, requests_sent):
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(('127.0.0.1', 0))
        silent.listen(8)
        _point_hub_at(monkeypatch, f'http://127.0.0.1:{silent.getsockname()[1]}')
        monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', False)
        monkeypatch.setattr(hf_constants, 'HF_HUB_ETAG_TIMEOUT', 1)
        pretrained.write_manifest_entry(NAME, dict(sha256='0' * 64))  # published, not cached
        _assert_clear_failure(lambda: timm.create_model(NAME, pretrained=True))
        silent.setblocking(False)
        waiting = []  # what reached the silent server: connections it never accepted
        with contextlib.suppress(BlockingIOError):
            while True:
                waiting.append(silent.accept()[0])
        for conn in waiting:
            conn.close()
    # One HEAD for the weights, timed out and not retried; every request reached the silent server.
    assert len(_file_requests(requests_sent)) == 1 and len(waiting) == len(requests_sent)


def test_offline_with_nothing_cached_fails_at_once(hf_cache, monkeypatch, requests_sent):
    pretrained.write_manifest_entry(NAME, dict(sha256='0' * 64))  # published, not cached
    message = _assert_clear_failure(lambda: timm.create_model(NAME, pretrained=True))
    assert message.startswith(f'{NAME}: HF_HUB_OFFLINE is set')
    assert requests_sent == []


def test_unpublished_weights_say_how_to_get_some(hf_cache, monkeypatch):
    with pytest.raises(WeightsError, match='no published weights for sd_resnet32.c10j75.*seed-cache'):
        timm.create_model('sd_resnet32.c10j75', pretrained=True)


# --- hub check -----------------------------------------------------------------------------------------

def test_check_passes_a_fresh_folder(built, capsys, own_manifest):
    assert hub.check(built[1]) == []
    if have_data():  # another subset than the card's: compared within sampling error
        assert hub.check(built[1], limit=50) == []
    assert cli.main(['hub', 'check', str(built[1])] + ([] if have_data() else ['--skip-eval'])) == 0
    assert f'{built[1]}: ok' in capsys.readouterr().out


def test_check_limit_zero_evaluates_every_test_image(built, monkeypatch, own_manifest):
    """No --limit: the card's own images; --limit 0: all of them, as everywhere else."""
    need_data()
    measure, measured = hub.measure, []

    def spy(model, data_name, limit=None):
        fresh = measure(model, data_name, limit)
        measured.append((limit, fresh['num_images']))
        return fresh
    monkeypatch.setattr(hub, 'measure', spy)
    assert hub.check(built[1]) == [] and hub.check(built[1], limit=0) == []
    assert measured == [(LIMIT, LIMIT), (None, 10000)]


def test_a_folder_named_as_a_published_tag_must_hold_its_published_weights_wherever_it_lives(folder, capsys):
    """Pushed, it would replace the weights that the packaged published.json vouches for under that name."""
    recorded, sha = pretrained.load_manifest()[NAME]['sha256'], hub.sha256_file(folder / 'model.safetensors')
    assert not pretrained.is_shipped(folder) and recorded != sha
    assert hub.check(folder, evaluate=False) == [
        f'sd_zoo/weights/published.json lists sha256 {recorded} for {NAME}, the file has {sha}: not the published weights '
        f'of {NAME}; to publish them as its new version, build them into the checkout\'s hub_configs/ (sd-zoo hub '
        f'build --force), which records them']
    assert cli.main(['hub', 'check', str(folder), '--skip-eval']) == 2
    assert f'{folder}: FAILED' in capsys.readouterr().out
    assert cli.main(['hub', 'push', str(folder), '--repo-id', f'sd-zoo/{NAME}', '--dry-run']) == 2
    assert f'is not fit to push: sd_zoo/weights/published.json lists sha256 {recorded}' in capsys.readouterr().err


def test_a_new_version_of_a_published_tag_passes_check_once_its_build_records_it(built, tmp_path, own_manifest,
                                                                                  capsys):
    pretrained.write_manifest_entry(NAME, dict(sha256='0' * 64, model_args=source_model(built[0]).sd_config()))
    argv = ['hub', 'build', '--run', str(built[0]), '--skip-eval', '--pruning-rows', '0', '--out']
    assert cli.main(argv + [str(tmp_path / 'staged')]) == 0  # built elsewhere: not recorded, so not pushable
    assert 'not recorded in sd_zoo/weights/published.json, which publishes other weights as' in capsys.readouterr().out
    assert any('not the published weights of' in p for p in hub.check(tmp_path / 'staged' / NAME, evaluate=False))
    folder = hub.build(built[0], out=tmp_path / 'out', evaluate=False, manifest=own_manifest, pruning_rows=0)
    assert pretrained.load_manifest()[NAME]['sha256'] == hub.sha256_file(folder / 'model.safetensors')
    assert hub.check(folder, evaluate=False) == []


@pytest.mark.parametrize('shipped', hub.shipped_folders(), ids=lambda p: p.name)
def test_shipped_folders_pass_check_and_load_offline(shipped, hf_cache, monkeypatch):
    """Every folder in the checkout's hub_configs/ (none until the first weights land) is fit to push."""
    monkeypatch.setattr(pretrained, 'MANIFEST_PATH', REAL_MANIFEST)  # the published bytes, checked on every load
    assert hub.check(shipped, evaluate=have_data(), limit=500) == []
    hub.seed_cache([shipped])
    name = shipped.name
    reference = logits(sd_zoo.load_model(shipped / 'model.safetensors'))
    arch, _, tag = name.partition('.')
    default = timm.models.get_pretrained_cfg(arch).tag == tag  # the bare name loads the default tag's weights
    for source in (name, f'hf-hub:sd-zoo/{name}') + ((arch,) if default else ()):
        torch.testing.assert_close(logits(timm.create_model(source, pretrained=True)), reference, rtol=0, atol=0)


def test_check_catches_a_wrong_sha256(folder, capsys):
    readme = folder / 'README.md'
    sha = hub.sha256_file(folder / 'model.safetensors')
    readme.write_text(readme.read_text().replace(sha, 'f' * 64))
    problems = hub.check(folder, evaluate=False)
    assert any(f"sha256 {'f' * 64} in the card, but model.safetensors has {sha}" in p for p in problems)
    assert cli.main(['hub', 'check', str(folder), '--skip-eval']) == 2
    assert 'FAILED' in capsys.readouterr().out


def test_check_catches_changed_weights(folder):
    state = checkpoint.load_state_dict(folder / 'model.safetensors')
    state['fc.bias'] += 1
    model = timm.create_model('sd_resnet20')
    model.load_state_dict(state)
    checkpoint.save_weights(model, folder / 'model.safetensors', 'sd_resnet20')
    assert any('in the card, but model.safetensors has' in p for p in hub.check(folder, evaluate=False))


def test_check_catches_a_wrong_metric(folder):
    need_data()
    readme = folder / 'README.md'
    card = read_card(readme)
    err = card_metrics(card)['top1_error']
    wrong = round(err - 7.5, 2)
    text = readme.read_text()
    text = text.replace(f'value: {err}\n', f'value: {wrong}\n').replace(
        f'value: {round(100 - err, 2)}\n', f'value: {round(100 - wrong, 2)}\n')
    readme.write_text(text)
    problems = hub.check(folder)
    assert any(f'top1_error {wrong} in the card, but a fresh evaluation on the same images gives {err}' in p
               for p in problems), problems
    assert not [p for p in problems if 'do not add up' in p]


@pytest.mark.parametrize('pct, n_card, n_fresh', [(54.0, 100, 10000), (8.0, 10000, 500), (30.0, 200, 300)])
def test_check_tolerance_is_four_standard_deviations_of_the_difference(pct, n_card, n_fresh):
    """Errors measured on two independent samples of the sizes given: 4 sd is almost never exceeded, 2 sd
    (half the band) about 4.6 % of the time, whichever of the two samples is the small one."""
    tol = hub._metric_tolerance(pct, n_card, n_fresh, same_images=False) - 0.005
    assert tol == pytest.approx(hub._metric_tolerance(pct, n_fresh, n_card, same_images=False) - 0.005)
    rng = np.random.default_rng(0)
    card, fresh = (rng.binomial(n, pct / 100, 200_000) / n for n in (n_card, n_fresh))
    diff = 100 * (card - fresh)
    assert np.mean(np.abs(diff) > tol) < 1e-3 and 0.03 < np.mean(np.abs(diff) > tol / 2) < 0.065
    assert hub._metric_tolerance(pct, n_card, n_fresh, same_images=True) < 0.0051


def test_check_catches_config_that_disagrees_with_the_registry(folder):
    config = json.loads((folder / 'config.json').read_text())
    config['pretrained_cfg']['mean'] = [0.5, 0.5, 0.5]
    config['model_args']['sd_rule'] = 'no-such-rule'
    (folder / 'config.json').write_text(json.dumps(config))
    problems = '\n'.join(hub.check(folder, evaluate=False))
    assert 'pretrained_cfg mean = [0.5, 0.5, 0.5], but the registered cfg' in problems
    assert "model_args do not build sd_resnet20: unknown sd_rule 'no-such-rule'" in problems


# --- push ----------------------------------------------------------------------------------------------

def test_push_dry_run_lists_the_files_without_network(built, capsys, own_manifest):
    assert cli.main(['hub', 'push', str(built[1]), '--repo-id', f'sd-zoo/{NAME}', '--dry-run']) == 0
    out = capsys.readouterr().out
    for f in hub.REQUIRED_FILES:
        assert f in out
    assert hub.sha256_file(built[1] / 'model.safetensors') in out


@pytest.mark.filterwarnings('ignore:Use .content=:DeprecationWarning')  # huggingface_hub's own LFS PUT
def test_push_uploads_every_file_to_a_hub_stub(built, monkeypatch, own_manifest):
    folder = built[1]
    # hf_xet is installed, so huggingface_hub would move LFS files with the Xet protocol, which needs a
    # content-addressed store; with Xet disabled it uses the LFS batch API, which the stub implements.
    monkeypatch.setattr(hf_constants, 'HF_HUB_DISABLE_XET', True)
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', False)
    with HubStub(token='hf_stub_token') as stub, ThreadPoolExecutor(1) as pool:
        job = pool.submit(hub.push, folder, f'sd-zoo/{NAME}', private=True, token='hf_stub_token',
                          endpoint=stub.url)
        info = job.result(timeout=120)  # bounded: a protocol mismatch fails instead of hanging
    assert info.oid == 'c' * 40
    repo = stub.repos[f'sd-zoo/{NAME}']
    assert repo['private'] and NAME in repo['message']
    assert sorted(repo['files']) == sorted(hub.REQUIRED_FILES)
    for name, content in repo['files'].items():
        assert content == (folder / name).read_bytes(), name
    assert hashlib.sha256(repo['files']['model.safetensors']).hexdigest() == \
        read_card(folder / 'README.md').data.to_dict()['sd_zoo']['weights_sha256']
    binary = ('model.safetensors', 'survival_schedule.png')
    assert sorted(stub.lfs) == sorted(hub.sha256_file(folder / f) for f in binary)
    paths = [(r['method'], r['path'].split('?')[0]) for r in stub.requests]
    assert paths[0] == ('POST', '/api/repos/create') and paths[-1] == ('POST', f'/api/models/sd-zoo/{NAME}/commit/main')
    assert ('POST', f'/sd-zoo/{NAME}.git/info/lfs/objects/batch') in paths
    assert all(r['headers'].get('authorization') == 'Bearer hf_stub_token'
               for r in stub.requests if not r['path'].startswith('/lfs-upload/'))


def test_push_refuses_a_broken_folder(folder):
    (folder / 'survival_schedule.png').unlink()
    with pytest.raises(WeightsError, match='(?s)not fit to push.*missing file survival_schedule.png'):
        hub.push(folder, f'sd-zoo/{NAME}', dry_run=True)


# --- seed-cache from the command line, schedule plots --------------------------------------------------

def test_seed_cache_command_then_offline_load(built, hf_cache, capsys):
    assert cli.main(['hub', 'seed-cache', str(built[1]), '--cache-dir', str(hf_cache)]) == 0
    assert f'cached models--sd-zoo--{NAME}' in capsys.readouterr().out
    torch.testing.assert_close(logits(timm.create_model(NAME, pretrained=True)), logits(source_model(built[0])))


def test_schedule_plot(tmp_path, capsys):
    from sd_zoo.evaluation.schedule_plot import plot_schedule
    assert plot_schedule([1.0, 0.75, 0.5], tmp_path / 'list.png').read_bytes()[:4] == b'\x89PNG'
    assert cli.main(['schedule', '--model', 'sd_resnet110', '-o', str(tmp_path / 's.png')]) == 0
    assert '54 blocks, expected depth 40.25' in capsys.readouterr().out
    assert (tmp_path / 's.png').stat().st_size > 1000


def _seed_without_symlinks(folder: Path, monkeypatch) -> Path:
    """Seed the cache as huggingface_hub does where the file system has no symlinks: copies in snapshots/."""
    def no_symlinks(self, target, target_is_directory=False):
        raise OSError('symbolic links are not supported here')
    with monkeypatch.context() as m:
        m.setattr(Path, 'symlink_to', no_symlinks)
        (snapshot,) = hub.seed_cache([folder])
    weights = snapshot / 'model.safetensors'
    assert weights.is_file() and not weights.is_symlink()
    return weights


def test_a_cache_without_symlinks_loads_the_published_weights_checked_against_the_manifest(tmp_path, monkeypatch):
    shipped = pretrained.SHIPPED_DIR / NAME
    cache = tmp_path / 'hub'
    monkeypatch.setattr(hf_constants, 'HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', True)
    weights = _seed_without_symlinks(shipped, monkeypatch)
    model = timm.create_model(NAME, pretrained=True)  # the real manifest: its record is what is checked
    torch.testing.assert_close(logits(model), logits(sd_zoo.load_model(shipped)), rtol=0, atol=0)
    raw = bytearray(weights.read_bytes())
    raw[len(raw) - 5000] ^= 0x04  # flipped bits in the copy: caught by the manifest's digest, not by a blob name
    weights.write_bytes(bytes(raw))
    recorded = pretrained.load_manifest()[NAME]['sha256']
    with pytest.raises(WeightsError, match=f'fail their check: .*its sha256 is [0-9a-f]{{64}}, but {recorded} was recorded'):
        timm.create_model(NAME, pretrained=True)


def test_the_card_states_the_processor_precision_and_seconds_per_epoch_the_run_recorded(tmp_path):
    run = make_run(tmp_path / 'run')
    config = json.loads((run / 'summary.json').read_text())['config']
    config['amp'] = 'bf16'
    (run / 'summary.json').write_text(json.dumps(dict(json.loads((run / 'summary.json').read_text()), config=config)))
    old_card = (hub.build(run, out=tmp_path / 'old', evaluate=False, pruning_rows=0) / 'README.md').read_text()
    assert '| amp |' not in old_card  # a CPU run that recorded no precision ignored amp: the card must not claim it
    record = json.loads((run / 'run.json').read_text())
    record.update(processor='Example CPU 9000', threads=2,
                  precision='precision: bf16 autocast (AMX computes bf16 natively)')
    (run / 'run.json').write_text(json.dumps(record))
    (run / 'metrics.jsonl').write_text(''.join(json.dumps(dict(epoch=e, epoch_time_s=t)) + '\n'
                                               for e, t in ((1, 140.0), (2, 150.0), (3, 900.0))))
    note = 'Trained for 100 epochs: at 30 the training error (12.5 %) was still that of validation.'
    card = (hub.build(run, out=tmp_path / 'new', evaluate=False, pruning_rows=0, note=note) / 'README.md').read_text()
    assert '| amp | `bf16` |' in card and f'\n{note}\n' in card.split('## Training recipe')[1].split('Reproduce')[0]
    assert 'Trained for 100 epochs' not in old_card
    assert ('on cpu (Example CPU 9000, 2 threads) in bf16 autocast (AMX computes bf16 natively), '
            'median 150 s per epoch of training') in card  # the epoch that shared the CPU does not swamp it


@pytest.mark.slow
def test_a_cifar100_fine_tune_of_published_weights_builds_checks_and_loads_from_its_folder(tmp_path, hf_cache,
                                                                                         capsys):
    need_data('cifar100-jpeg75')
    monkey_manifest = pretrained.MANIFEST_PATH  # the fixture's empty manifest: the shipped one is only read
    shutil.copyfile(REAL_MANIFEST, monkey_manifest)
    hub.seed_cache([pretrained.SHIPPED_DIR / NAME])
    run = tmp_path / 'finetune'
    assert cli.main(['train', '--model', NAME, '--pretrained', '--data', 'cifar100-jpeg75', '--epochs', '1',
                     '--batch-size', '64', '--train-subset', '200', '--val-size', '100', '--test-subset', '200',
                     '--lr', '0.01', '--num-threads', '1', '--quiet', '--output', str(run)]) == 0
    assert cli.main(['hub', 'build', '--run', str(run), '--out', str(tmp_path / 'hub'), '--limit', '200',
                     '--pruning-rows', '0', '--no-manifest']) == 0
    folder = tmp_path / 'hub' / 'sd_resnet20.c100j75'
    assert cli.main(['hub', 'check', str(folder), '--limit', '200']) == 0
    capsys.readouterr()
    model = timm.create_model(f'local-dir:{folder}', pretrained=True)
    assert model.num_classes == 100 and model.sd_config()['drop_path_rate'] == 0.5
    torch.testing.assert_close(logits(model), logits(sd_zoo.load_model(run / 'best.safetensors')), rtol=0, atol=0)
    # The fine-tune kept the published body: every tensor but the new classifier started from it.
    card = (folder / 'README.md').read_text()
    assert 'CIFAR-100 (JPEG-75 copy)' in card and 'sd_resnet20.c100j75' in card
    assert json.loads((folder / 'config.json').read_text())['label_names'] == list(data.CIFAR100_CLASSES)


def test_a_run_resumed_on_other_hardware_states_each_stretch_of_epochs_on_its_card(tmp_path):
    run = make_run(tmp_path / 'run')
    record = json.loads((run / 'run.json').read_text())
    zen = dict(device='cpu', processor='Example CPU 3', threads=2, world_size=1, torch='2.14.1',
               amp='none', precision='precision: fp32 (bf16 would be emulated on this cpu, which is slower)')
    amx = dict(zen, processor='Example CPU 4', amp='bf16',
               precision='precision: bf16 autocast (AMX computes bf16 natively)')
    # Resumed twice on the first machine, then once on the second: consecutive parts alike are one stretch.
    record['parts'] = [dict(zen, first_epoch=1), dict(zen, first_epoch=2), dict(amx, first_epoch=3)]
    (run / 'run.json').write_text(json.dumps(record))
    summary = json.loads((run / 'summary.json').read_text())
    summary.update(final_epoch=4, config=dict(summary['config'], amp='auto', epochs=4))
    (run / 'summary.json').write_text(json.dumps(summary))
    (run / 'metrics.jsonl').write_text(''.join(json.dumps(dict(epoch=e, epoch_time_s=t)) + '\n'
                                               for e, t in ((1, 800.0), (2, 900.0), (3, 150.0), (4, 140.0))))
    card = (hub.build(run, out=tmp_path / 'hub', evaluate=False, pruning_rows=0) / 'README.md').read_text()
    assert '| amp | `auto` |' in card
    assert ('Training took 0.5 min: epochs 1–2 on cpu (Example CPU 3, 2 threads) in fp32 (bf16 would be emulated '
            'on this cpu, which is slower), median 850 s per epoch of training, torch 2.14.1; epochs 3–4 on cpu '
            '(Example CPU 4, 2 threads) in bf16 autocast (AMX computes bf16 natively), median 145 s per epoch of '
            'training, torch 2.14.1.') in card
