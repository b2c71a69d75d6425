"""Hub folders: build from a run, load through the Hugging Face cache (registry name and hf-hub: name),
adapt on load, fail fast and clearly, check, push to a local stub of the Hub API, schedule plots.

Nothing here reaches a network: every test runs with a temporary Hugging Face cache and an endpoint on
127.0.0.1. Weights are a freshly initialised sd_resnet20 written into a temporary run folder.
"""
import base64
import hashlib
import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

import sd_zoo  # noqa: F401  (registers the models)
import timm
from huggingface_hub import constants as hf_constants
from sd_zoo import checkpoint, cli, data, hub, pretrained
from sd_zoo.errors import ConfigError, WeightsError
from sd_zoo.model_card import PAPER_RESULTS, card_metrics, read_card

NAME = 'sd_resnet20.c10j75'
HAVE_DATA = (data.data_root() / 'cifar10-jpeg75.tar.gz').exists()
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
                   sd_config=model.sd_config(), config=config)
    (folder / 'summary.json').write_text(json.dumps(summary))
    (folder / 'run.json').write_text(json.dumps(dict(
        commands=[f'sd-zoo train --model sd_resnet20 --data cifar10-jpeg75 --drop-path-rate {drop_path_rate} '
                  f'--output {folder.resolve()}'], config=config, world_size=1, device='cpu')))
    (folder / 'metrics.jsonl').write_text(json.dumps(dict(epoch=1, test_err=90.0)) + '\n')
    return folder


def build(run: Path, out: Path, **kwargs) -> Path:
    return hub.build(run, out=out, evaluate=HAVE_DATA, limit=LIMIT if HAVE_DATA else None, **kwargs)


def source_model(run: Path):
    return checkpoint.load_weights(run / 'best.safetensors')


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


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline mode, no token, and an endpoint where nothing answers."""
    cache = tmp_path / 'hf' / 'hub'
    for key, value in dict(HF_HOME=str(tmp_path / 'hf'), HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE='1').items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv('HF_TOKEN', raising=False)
    # huggingface_hub reads its environment once, at import: patch the module constants it consults.
    monkeypatch.setattr(hf_constants, 'HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(hf_constants, 'ENDPOINT', _closed_port_url())
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
    with pytest.raises(ConfigError, match='are tag c10j75_cd, not c10j75'):
        hub.build(run, out=tmp_path / 'out2', tag='c10j75', evaluate=False)


def test_every_constant_depth_tag_builds_constant_depth():
    cd_tags = [n for n in timm.list_pretrained('sd_*') if n.endswith(pretrained.CONSTANT_DEPTH_SUFFIX)]
    assert 'sd_resnet20.c10j75_cd' in cd_tags
    for name in cd_tags:
        assert pretrained.TAG_MODEL_ARGS[name]['drop_path_rate'] == 0.0
        assert timm.create_model(name).sd_config()['drop_path_rate'] == 0.0


def test_build_records_the_weights_in_a_manifest(built, tmp_path):
    manifest = tmp_path / 'published.json'
    folder = hub.build(built[0], out=tmp_path / 'out', evaluate=False, manifest=manifest)
    entry = json.loads(manifest.read_text())[NAME]
    assert entry['sha256'] == hub.sha256_file(folder / 'model.safetensors')
    assert entry['model_args'] == dict(drop_path_rate=0.5, sd_schedule='linear', sd_gate='batch', sd_rule='paper')
    assert pretrained.load_manifest(manifest) == json.loads(manifest.read_text())


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


def test_non_default_settings_travel_in_config_json_and_the_manifest(tmp_path, hf_cache, monkeypatch):
    run = make_run(tmp_path / 'run', drop_path_rate=0.3, seed=3)
    manifest = tmp_path / 'published.json'
    folder = build(run, tmp_path / 'out', manifest=manifest)
    hub.seed_cache([folder])
    reference = logits(source_model(run))
    # hf-hub: the repo's config.json rebuilds p_L = 0.7, which the paper rule scales branches with.
    model = timm.create_model(f'hf-hub:sd-zoo/{NAME}', pretrained=True)
    assert model.sd_config()['drop_path_rate'] == 0.3
    torch.testing.assert_close(logits(model), reference, rtol=0, atol=0)
    # the registry name: the packaged manifest's model_args (here a temporary one) carry the same settings
    monkeypatch.setitem(pretrained.TAG_MODEL_ARGS, NAME, pretrained.load_manifest(manifest)[NAME]['model_args'])
    torch.testing.assert_close(logits(timm.create_model(NAME, pretrained=True)), reference, rtol=0, atol=0)


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
    with pytest.raises(WeightsError, match='not a readable safetensors file.*seed-cache'):
        timm.create_model(f'local-dir:{folder}', pretrained=True)


def test_corrupt_cached_weights_fail_with_advice(built, hf_cache):
    (snapshot,) = hub.seed_cache([built[1]])
    blob = (snapshot / 'model.safetensors').resolve()
    blob.write_bytes(blob.read_bytes()[:1000])  # a download cut short
    with pytest.raises(WeightsError, match='cached weights of .* not a readable safetensors file'):
        timm.create_model(NAME, pretrained=True)


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
    with pytest.raises(WeightsError, match='missing model.safetensors, README.md'):
        hub.seed_cache([folder])
    with pytest.raises(WeightsError, match='has no model.safetensors'):
        timm.create_model(f'local-dir:{folder}', pretrained=True)


def test_pickle_weights_are_refused(folder, tmp_path, hf_cache):
    state = checkpoint.load_state_dict(folder / 'model.safetensors')
    pth = tmp_path / 'weights.pth'
    torch.save(state, pth)
    with pytest.raises(WeightsError, match='pickle-based.*allow_pickle=True'):
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

def _assert_fast_clear_failure(fn, limit_s: float = 5.0):
    start = time.monotonic()
    with pytest.raises(WeightsError) as info:
        fn()
    elapsed = time.monotonic() - start
    assert elapsed < limit_s, f'took {elapsed:.1f} s'
    assert 'HF_HUB_OFFLINE' in str(info.value) and 'sd-zoo hub seed-cache' in str(info.value)
    assert 'pretrained_cfg_overlay=dict(file=' in str(info.value)
    return str(info.value)


@pytest.mark.parametrize('name', [NAME, f'hf-hub:sd-zoo/{NAME}'])
def test_nothing_cached_and_no_hub_fails_in_seconds(hf_cache, monkeypatch, name):
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', False)  # online, but the endpoint refuses connections
    monkeypatch.setattr(pretrained, 'PUBLISHED', {NAME})
    message = _assert_fast_clear_failure(lambda: pretrained.create_pretrained(name))
    assert 'cannot reach the Hugging Face Hub' in message


def test_an_unresponsive_hub_costs_one_timeout_not_a_minute_of_retries(hf_cache, monkeypatch):
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(('127.0.0.1', 0))
        silent.listen(8)
        monkeypatch.setattr(hf_constants, 'ENDPOINT', f'http://127.0.0.1:{silent.getsockname()[1]}')
        monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', False)
        monkeypatch.setattr(hf_constants, 'HF_HUB_ETAG_TIMEOUT', 1)
        monkeypatch.setattr(pretrained, 'PUBLISHED', {NAME})
        _assert_fast_clear_failure(lambda: timm.create_model(NAME, pretrained=True), limit_s=4.0)


def test_offline_with_nothing_cached_fails_at_once(hf_cache, monkeypatch):
    monkeypatch.setattr(pretrained, 'PUBLISHED', {NAME})
    message = _assert_fast_clear_failure(lambda: timm.create_model(NAME, pretrained=True), limit_s=1.0)
    assert message.startswith(f'{NAME}: HF_HUB_OFFLINE is set')


def test_unpublished_weights_say_how_to_get_some(hf_cache, monkeypatch):
    monkeypatch.setattr(pretrained, 'PUBLISHED', set())
    with pytest.raises(WeightsError, match='no published weights for sd_resnet32.c10j75.*seed-cache'):
        timm.create_model('sd_resnet32.c10j75', pretrained=True)


# --- hub check -----------------------------------------------------------------------------------------

def test_check_passes_a_fresh_folder(built, capsys):
    assert hub.check(built[1]) == []
    if HAVE_DATA:  # another subset than the card's: compared within sampling error
        assert hub.check(built[1], limit=50) == []
    assert cli.main(['hub', 'check', str(built[1])] + ([] if HAVE_DATA else ['--skip-eval'])) == 0
    assert f'{built[1]}: ok' in capsys.readouterr().out


@pytest.mark.parametrize('shipped', hub.shipped_folders(), ids=lambda p: p.name)
def test_shipped_folders_pass_check_and_load_offline(shipped, hf_cache):
    """Every folder in the checkout's hub_configs/ (none until the first weights land) is fit to push."""
    assert hub.check(shipped, evaluate=HAVE_DATA, limit=500) == []
    hub.seed_cache([shipped])
    name = shipped.name
    reference = logits(checkpoint.load_weights(shipped / 'model.safetensors'))
    for source in (name, f'hf-hub:sd-zoo/{name}'):
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


@pytest.mark.skipif(not HAVE_DATA, reason='needs the CIFAR-10 (JPEG-75 copy) test set')
def test_check_catches_a_wrong_metric(folder):
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


def test_check_catches_config_that_disagrees_with_the_registry(folder):
    config = json.loads((folder / 'config.json').read_text())
    config['pretrained_cfg']['mean'] = [0.5, 0.5, 0.5]
    config['model_args']['sd_rule'] = 'no-such-rule'
    (folder / 'config.json').write_text(json.dumps(config))
    problems = '\n'.join(hub.check(folder, evaluate=False))
    assert 'pretrained_cfg mean = [0.5, 0.5, 0.5], but the registered cfg' in problems
    assert "model_args do not build sd_resnet20: unknown sd_rule 'no-such-rule'" in problems


# --- push ----------------------------------------------------------------------------------------------

class HubStub:
    """A local stand-in for the few Hub endpoints huggingface_hub 2.4 calls to create a repo and commit files.

    It speaks the real protocol and keeps a repository: ``create`` (repo), ``validate-yaml`` (parses the
    README front matter and rejects a card without library_name or model-index), ``preupload`` (LFS for
    binary files, as the Hub's .gitattributes does, regular for text), the LFS batch API with the basic
    transfer (PUT of the bytes, checked against their sha256 oid, then verify), and ``commit`` (ndjson:
    base64 content for regular files, oid references for LFS files, which must have been uploaded).
    Anything else is a 404. Every request is recorded.
    """

    def __init__(self, token: str):
        self.token, self.requests, self.lfs, self.repos = token, [], {}, {}
        stub = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 30  # a stuck client cannot hold the server thread forever

            def _body(self) -> bytes:
                if self.headers.get('Transfer-Encoding', '').lower() == 'chunked':
                    body = b''
                    while True:
                        size = int(self.rfile.readline().strip(), 16)
                        if not size:
                            self.rfile.readline()
                            return body
                        body += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get('Content-Length') or 0))

            def _reply(self, code: int, obj=None):
                data = json.dumps(obj if obj is not None else {}).encode()
                self.send_response(code)
                self.send_header('Content-Type', 'application/json')
                self.send_header('Content-Length', str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self):
                body = self._body()
                stub.requests.append(dict(method=self.command, path=self.path, body=body,
                                          headers={k.lower(): v for k, v in self.headers.items()}))
                code, obj = stub.route(self.command, self.path.split('?')[0], body, self.headers)
                self._reply(code, obj)

            do_GET = do_POST = do_PUT = do_HEAD = _handle

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self.server.server_address[1]}'

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def route(self, method, path, body, headers):
        if headers.get('Authorization') != f'Bearer {self.token}' and not path.startswith('/lfs-upload/'):
            return 401, dict(error='Invalid credentials')
        if (method, path) == ('POST', '/api/repos/create'):
            req = json.loads(body)
            repo_id = f'{req["organization"]}/{req["name"]}'
            self.repos.setdefault(repo_id, dict(private=req.get('visibility') == 'private', files={}))
            return 200, dict(url=f'{self.url}/{repo_id}')
        if (method, path) == ('POST', '/api/validate-yaml'):
            import yaml
            front = yaml.safe_load(json.loads(body)['content'].split('---')[1])
            errors = [dict(message=f'missing {k}') for k in ('library_name', 'model-index') if k not in front]
            return (400, dict(errors=errors)) if errors else (200, dict(warnings=[]))
        if method == 'POST' and '/preupload/' in path:
            files = json.loads(body)['files']
            binary = ('.safetensors', '.png')
            return 200, dict(files=[dict(path=f['path'], shouldIgnore=False,
                                         uploadMode='lfs' if f['path'].endswith(binary) else 'regular')
                                    for f in files])
        if method == 'POST' and path.endswith('.git/info/lfs/objects/batch'):
            req = json.loads(body)
            assert req['operation'] == 'upload' and 'basic' in req['transfers']
            return 200, dict(transfer='basic', objects=[dict(
                oid=o['oid'], size=o['size'], authenticated=True,
                actions=dict(upload=dict(href=f'{self.url}/lfs-upload/{o["oid"]}'),
                             verify=dict(href=f'{self.url}/lfs-verify'))) for o in req['objects']])
        if method == 'PUT' and path.startswith('/lfs-upload/'):
            oid = path.rsplit('/', 1)[1]
            if hashlib.sha256(body).hexdigest() != oid:
                return 400, dict(error='content does not match its sha256 oid')
            self.lfs[oid] = body
            return 200, {}
        if (method, path) == ('POST', '/lfs-verify'):
            req = json.loads(body)
            ok = req['oid'] in self.lfs and len(self.lfs[req['oid']]) == req['size']
            return (200, {}) if ok else (404, dict(error='object not uploaded'))
        if method == 'POST' and '/commit/' in path:
            repo_id = path.split('/api/models/')[1].split('/commit/')[0]
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            assert lines[0]['key'] == 'header'
            files = {}
            for line in lines[1:]:
                value = line['value']
                if line['key'] == 'file':
                    files[value['path']] = base64.b64decode(value['content'])
                elif line['key'] == 'lfsFile':
                    if value['oid'] not in self.lfs:
                        return 422, dict(error=f'LFS object {value["oid"]} was never uploaded')
                    files[value['path']] = self.lfs[value['oid']]
            self.repos[repo_id]['files'].update(files)
            self.repos[repo_id]['message'] = lines[0]['value']['summary']
            return 200, dict(commitUrl=f'{self.url}/{repo_id}/commit/{"c" * 40}', commitOid='c' * 40)
        return 404, dict(error=f'the stub does not serve {method} {path}')


def test_push_dry_run_lists_the_files_without_network(built, capsys):
    assert cli.main(['hub', 'push', str(built[1]), '--repo-id', f'sd-zoo/{NAME}', '--dry-run']) == 0
    out = capsys.readouterr().out
    for f in hub.REQUIRED_FILES:
        assert f in out
    assert hub.sha256_file(built[1] / 'model.safetensors') in out


@pytest.mark.filterwarnings('ignore:Use .content=:DeprecationWarning')  # huggingface_hub's own LFS PUT
def test_push_uploads_every_file_to_a_hub_stub(built, monkeypatch):
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
    from sd_zoo.schedule_plot import plot_schedule
    assert plot_schedule([1.0, 0.75, 0.5], tmp_path / 'list.png').read_bytes()[:4] == b'\x89PNG'
    assert cli.main(['schedule', '--model', 'sd_resnet110', '-o', str(tmp_path / 's.png')]) == 0
    assert '54 blocks, expected depth 40.25' in capsys.readouterr().out
    assert (tmp_path / 's.png').stat().st_size > 1000
