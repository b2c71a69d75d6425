"""The one-command GPU run (benchmarks/gpu_lease.sh): its dry run on the CPU end to end, the limits on what
comes back, how the training time is shared, and the carried wheels."""
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from sd_zoo import data
from sd_zoo.deploy.onnx_export import FP32_RTOL

from conftest import need_data

REPO = Path(__file__).resolve().parents[1]


def _load_lease():
    spec = importlib.util.spec_from_file_location('gpu_lease', REPO / 'benchmarks' / 'gpu_lease.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_lease = _load_lease()


@pytest.mark.slow
def test_dry_run_runs_the_whole_path_and_obeys_the_limits(tmp_path):
    for name in ('cifar10-jpeg75', 'cifar100-jpeg75'):
        if not (REPO / '.lease' / 'data' / f'{name}.tar.gz').exists():  # the lease's own copy, else the data folder
            need_data(name)
    out = tmp_path / 'out'
    out.mkdir()
    env = dict(os.environ, DRY_RUN='1', OUT=str(out), PYTHON=sys.executable)
    result = subprocess.run(['bash', str(REPO / 'benchmarks' / 'gpu_lease.sh')], env=env, capture_output=True,
                            text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # What comes back: at most 8 files of at most 16 MiB, no deeper than $OUT/a/b/file, plain names.
    files = [p for p in out.rglob('*') if p.is_file()]
    assert 1 <= len(files) <= 8
    for path in files:
        rel = path.relative_to(out)
        assert path.stat().st_size <= 16 * 2 ** 20 and len(rel.parts) <= 3
        assert all(gpu_lease.NAME_OK.fullmatch(part) for part in rel.parts), rel
    assert sorted(p.name for p in files) == ['lease.json', 'run1_c10_sd.tar', 'run2_c10_cd.tar', 'run3_c100_sd.tar',
                                             'run4_c100_cd.tar']

    lease = json.loads((out / 'lease.json').read_text())
    assert lease['errors'] == [] and lease['dry_run']
    assert lease['versions']['torch'] and lease['packages']['timm']
    sharing = lease['sharing']
    assert sharing['chosen'] in ('sequential', 'two processes')
    assert sharing['one_process_images_per_s'] > 0 and sharing['two_processes_images_per_s'] > 0
    assert sharing['sd_over_cd'] == pytest.approx(sharing['sd_images_per_s'] / sharing['cd_images_per_s'])
    for key, dataset, rate in gpu_lease.RUNS:
        run = lease['runs'][key]
        assert run['status'] == 'finished' and run['drop_path_rate'] == rate
        assert 1 <= run['epochs_run'] == run['epochs'] <= run['epochs_cap']
        assert run['images_per_s'] > 0 and 0 <= run['test_err_at_best_val'] <= 100
        if rate == 0.0 and sharing['chosen'] == 'sequential':  # compared at equal epochs
            assert run['epochs_cap'] == lease['runs'][key.replace('_cd', '_sd')]['epochs_run']
        with tarfile.open(out / run['file']) as tar:
            names = set(tar.getnames())
            assert {f'{key}/{n}' for n in ('metrics.jsonl', 'summary.json', 'run.json', 'best.safetensors',
                                           'final.safetensors', 'train.log')} <= names
            summary = json.load(tar.extractfile(f'{key}/summary.json'))
            tar.extract(f'{key}/best.safetensors', tmp_path, filter='data')
        assert summary['config']['epochs'] == summary['time_budget']['epochs'] == run['epochs']
        assert summary['config']['data'] == dataset and summary['model_args']['drop_path_rate'] == rate
        from sd_zoo import load_model
        model = load_model(tmp_path / key / 'best.safetensors')
        assert model.num_classes == data.num_classes(dataset) and model.sd_config()['drop_path_rate'] == rate

    inference = lease['inference']
    # The export's own parity check (a fraction of the logit scale: the kernels, hence the last bits, differ by CPU).
    fp32 = inference['export']['fp32']
    assert fp32['probe_tolerance'] == pytest.approx(FP32_RTOL * max(1.0, fp32['probe_logit_scale']))
    assert 0 <= fp32['probe_max_abs_diff'] <= fp32['probe_tolerance']
    for bs in inference['batch_sizes']:
        assert inference['torch_latency'][str(bs)]['median_ms']['torch_eager_fp32'] > 0
        assert inference['ort_cpu_latency'][str(bs)]['median_ms']['ort_cpu_fp32'] > 0
    # What needs CUDA is recorded as skipped, not failed.
    assert set(inference['torch_latency']['skipped']) == {'torch_eager_bf16_cl', 'torch_cudagraph_fp32',
                                                          'torch_cudagraph_bf16_cl'}
    assert inference['compile_latency'] == {'skipped': 'dry run'}
    assert 'CUDAExecutionProvider' in inference['missing']['ort_cuda']
    # The table comes last.
    tail = result.stdout.strip().splitlines()
    assert tail[-1].startswith('$OUT: lease.json, run1_c10_sd.tar') and tail[-2] == 'errors: 0'


def test_sequential_runs_split_each_pair_for_equal_epochs(tmp_path):
    lease = gpu_lease.Lease(gpu_lease.DRY_PLAN, tmp_path, tmp_path / 'work')
    lease.record['sharing'] = dict(chosen='sequential', sd_over_cd=1.25)
    clock, calls = [10.0], []
    lease.now = lambda: clock[0]

    def fake_train(runs, budget, cap, extra=()):
        calls.append(([r.key for r in runs], budget, cap, extra))
        clock[0] += budget
        for r in runs:
            r.result = dict(epochs_run=7, warmup_epochs=0.25) if r.key.endswith('sd') else dict(epochs_run=6)
    lease.train = fake_train
    lease.train_all()
    assert [c[0] for c in calls] == [['c10_sd'], ['c10_cd'], ['c100_sd'], ['c100_cd']]
    setup, end = gpu_lease.DRY_PLAN.setup_s, lease.train_end()
    (_, sd1, cap1, extra1), (_, cd1, cap2, extra2), (_, sd2, _, _), (_, cd2, cap4, _) = calls
    assert sd1 + cd1 == pytest.approx((end - 10.0) / 2) and sd2 + cd2 == pytest.approx((end - 10.0) / 2)
    # Training time (budget less set-up) in inverse proportion to speed: stochastic depth is 1.25x faster.
    assert (cd1 - setup) / (sd1 - setup) == pytest.approx(1.25)
    # The constant-depth run: the epochs and the warm-up its partner had.
    assert cap1 == gpu_lease.DRY_PLAN.epochs_cap and cap2 == cap4 == 7
    assert extra1 == () and extra2 == ('--warmup-epochs', '0.25')


def test_concurrent_runs_start_in_pairs_with_equal_time(tmp_path):
    lease = gpu_lease.Lease(gpu_lease.DRY_PLAN, tmp_path, tmp_path / 'work')
    lease.record['sharing'] = dict(chosen='two processes', sd_over_cd=1.25)
    clock, calls = [0.0], []
    lease.now = lambda: clock[0]
    lease.train = lambda runs, budget, cap, extra=(): (calls.append(([r.key for r in runs], budget)),
                                             clock.__setitem__(0, clock[0] + budget))
    lease.train_all()
    assert calls == [(['c10_sd', 'c10_cd'], lease.train_end() / 2), (['c100_sd', 'c100_cd'], lease.train_end() / 2)]


def test_check_out_names_every_broken_limit(tmp_path):
    lease = gpu_lease.Lease(gpu_lease.DRY_PLAN, tmp_path, tmp_path / 'work')
    (tmp_path / 'a' / 'b').mkdir(parents=True)
    (tmp_path / 'a' / 'b' / 'ok.json').write_text('{}')
    assert lease.check_out() == []
    with open(tmp_path / 'big.tar', 'wb') as f:
        f.truncate(16 * 2 ** 20 + 1)
    (tmp_path / 'a' / 'b' / 'c').mkdir()
    (tmp_path / 'a' / 'b' / 'c' / 'deep.txt').write_text('x')
    (tmp_path / 'sp ace.txt').write_text('x')
    for i in range(5):
        (tmp_path / f'f{i}.txt').write_text('x')
    problems = lease.check_out()
    assert any('9 files in $OUT' in p for p in problems)
    assert any(p.startswith('big.tar is 16.0 MiB') for p in problems)
    assert any(p.startswith('a/b/c/deep.txt: too deep') for p in problems)
    assert any(p.startswith('sp ace.txt:') for p in problems)
    assert len(problems) == 4


def test_pack_leaves_out_the_final_weights_when_the_file_would_pass_16_mib(tmp_path):
    out, folder = tmp_path / 'out', tmp_path / 'run'
    out.mkdir()
    folder.mkdir()
    lease = gpu_lease.Lease(gpu_lease.DRY_PLAN, out, tmp_path / 'work')
    run = gpu_lease.Run(1, 'c10_sd', 'cifar10-jpeg75', 0.5, folder)
    (folder / 'metrics.jsonl').write_text(json.dumps(dict(epoch=1, test_err=50.0, images_per_s=10.0)) + '\n')
    for name in ('best.safetensors', 'final.safetensors'):
        (folder / name).write_bytes(b'\0' * (9 * 2 ** 20))
    lease.pack(run, final=True)
    with tarfile.open(out / run.file_name) as tar:
        assert sorted(tar.getnames()) == ['c10_sd/best.safetensors', 'c10_sd/metrics.jsonl', 'c10_sd/train.log']
    assert (out / run.file_name).stat().st_size <= 16 * 2 ** 20
    assert lease.record['dropped_files'] == {'c10_sd': ['final.safetensors']}
    assert sorted(p.name for p in out.iterdir()) == ['lease.json', run.file_name]


def test_versions_and_carried_wheels(tmp_path):
    assert gpu_lease.version_tuple('1.0.31+cu130') == (1, 0, 31)
    assert gpu_lease.version_tuple('1.0.9') < gpu_lease.version_tuple('1.0.20') < gpu_lease.version_tuple('1.1.0.dev0')
    assert gpu_lease.version_tuple(None) < gpu_lease.version_tuple('0.1')
    assert gpu_lease.version_tuple(gpu_lease.minimum_timm()) >= (1, 0)
    wheel = tmp_path / 'leasepkg-1.2.3-py3-none-any.whl'
    with zipfile.ZipFile(wheel, 'w') as zf:
        zf.writestr('leasepkg/__init__.py', 'VALUE = 42\n')
        zf.writestr('leasepkg-1.2.3.dist-info/METADATA', 'Name: leasepkg\nVersion: 1.2.3\n')
    site = tmp_path / 'site'
    gpu_lease.install_wheel(wheel, site)
    env = dict(os.environ, PYTHONPATH=str(site))
    code = 'import importlib.metadata as m, leasepkg; print(leasepkg.VALUE, m.version("leasepkg"))'
    assert subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                          check=True).stdout.split() == ['42', '1.2.3']


def test_gpu_onnx_bench_records_a_missing_cuda_provider_and_goes_on(tmp_path):
    spec = importlib.util.spec_from_file_location('gpu_onnx_bench', REPO / 'benchmarks' / 'gpu_onnx_bench.py')
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / 'bench.json'
    # Not a dry run: the path the GPU machine takes, where onnxruntime has no CUDA provider.
    rc = bench.main(['--model', 'sd_resnet20', '--batch-sizes', '2', '--repeats', '1', '--output', str(out)])
    result = json.loads(out.read_text())
    assert rc == 0 and not result['dry_run']
    assert 'CUDAExecutionProvider' in result['missing']['ort_cuda']
    assert result['ort_cpu_latency']['2']['median_ms']['ort_cpu_fp32'] > 0
    assert result['parity']['2']['ort_cpu_fp32_vs_torch_cpu'] < 1e-4
    assert result['bit_identity']['ort_cpu_fp32_batch2'] == dict(across_sessions=True, repeated_run=True)
