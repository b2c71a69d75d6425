#!/usr/bin/env python3
"""One command for a short GPU lease: train sd_resnet110 with and without stochastic depth on the CIFAR-10
and CIFAR-100 JPEG-75 copies within a fixed time, time GPU inference, and hand everything back in $OUT.

    bash benchmarks/gpu_lease_prepare.sh                       # development machine: fills the ignored .lease/
    bash benchmarks/gpu_lease.sh                               # GPU machine: .lease carried, timeout 570 s
    DRY_RUN=1 OUT=$(mktemp -d) bash benchmarks/gpu_lease.sh    # the same path on a CPU in 1 to 3 minutes

In order: the versions, GPU and cuDNN; timm (also tqdm, onnxscript) from the carried wheels when the
machine's own is missing or too old; both archives decoded once, while a probe measures the training
throughput of one process against two at once (and under CUDA MPS where the machine has it) to choose how
the runs share the GPU, and the images/s of stochastic against constant depth in one process; the four
training runs in priority order (CIFAR-10 stochastic depth p_L = 0.5, CIFAR-10 constant depth, then the
same pair on CIFAR-100), each ``sd-zoo train --recipe fast --time-budget`` sized so that everything ends
``margin_s`` before the command's timeout; the inference benchmark (``gpu_onnx_bench.py``); lease.json and
a table last.

Run sequentially, the constant-depth run of a pair gets the epochs its stochastic-depth partner chose, and
the pair's time is split by their measured speeds, so the two are compared at equal epochs; run at once,
each gets the same time and chooses its own epochs.

$OUT receives at most 8 files: ``lease.json`` (rewritten after every step) and one ``run<N>_<name>.tar``
per run (weights, metrics.jsonl, summary.json, run.json, curves, log; rewritten every few epochs), so a
command stopped at its timeout still returns every finished epoch. Only the timeout stops the script:
every failure goes into lease.json's ``errors`` and the next step runs.
"""
import argparse
import contextlib
import importlib.metadata
import importlib.util
import io
import itertools
import json
import os
import platform
import queue
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
LEASE_DIR = REPO / '.lease'
ARCHIVES = ('cifar10-jpeg75', 'cifar100-jpeg75')
# Priority order: (file key, dataset, drop_path_rate). Pairs share a dataset: stochastic depth first.
RUNS = (('c10_sd', 'cifar10-jpeg75', 0.5), ('c10_cd', 'cifar10-jpeg75', 0.0),
        ('c100_sd', 'cifar100-jpeg75', 0.5), ('c100_cd', 'cifar100-jpeg75', 0.0))
# What comes back from the machine: at most this many files of at most this size, names of these characters.
MAX_FILES, MAX_BYTES = 8, 16 * 2 ** 20
NAME_OK = re.compile(r'[A-Za-z0-9._-]+')
# Running two trainings at once must beat one process by this factor to be chosen.
CONCURRENCY_GAIN = 1.10
PROTOCOL = 'LEASE '  # prefix of the probe workers' answer lines


@dataclass(frozen=True)
class Plan:
    """Everything that differs between the GPU run and the dry run on a CPU."""
    dry: bool
    model: str
    timeout_s: float          # the command's timeout
    margin_s: float           # everything ends this long before it
    inference_s: float        # kept after training for the inference benchmark
    epochs_cap: int           # --epochs: the most a time budget may choose
    setup_s: float            # a training process's start-up, data loading and probe, roughly
    min_budget_s: float       # a run with less time than this is skipped
    grace_s: float            # a run still going this long after its budget is stopped
    probe_s: float            # length of each throughput window of the sharing probe
    probe_batch: int
    probe_block: int          # steps per model between alternations in the probe
    pack_every_s: float       # a run's file is rewritten at most this often
    train_args: tuple = ()

    @staticmethod
    def from_env() -> 'Plan':
        dry = os.environ.get('DRY_RUN', '') not in ('', '0')
        plan = DRY_PLAN if dry else GPU_PLAN
        timeout = float(os.environ.get('LEASE_TIMEOUT_S', plan.timeout_s))
        margin = float(os.environ.get('LEASE_MARGIN_S', plan.margin_s))
        return Plan(**dict(plan.__dict__, timeout_s=timeout, margin_s=margin))


GPU_PLAN = Plan(dry=False, model='sd_resnet110', timeout_s=570, margin_s=60, inference_s=120, epochs_cap=60,
                setup_s=15, min_budget_s=40, grace_s=30, probe_s=4, probe_batch=512, probe_block=3,
                pack_every_s=20)
DRY_PLAN = Plan(dry=True, model='sd_resnet20', timeout_s=210, margin_s=30, inference_s=40, epochs_cap=3,
                setup_s=8, min_budget_s=12, grace_s=20, probe_s=1.5, probe_batch=32, probe_block=1,
                pack_every_s=3, train_args=('--train-subset', '256', '--val-size', '100', '--test-subset', '100',
                                            '--batch-size', '32', '--eval-batch-size', '100', '--num-threads', '1',
                                            '--device', 'cpu'))


def _load_time_budget():
    """sd_zoo/training/time_budget.py on its own: the orchestrator never imports torch or timm (see ensure_packages)."""
    spec = importlib.util.spec_from_file_location('sd_zoo_time_budget', REPO / 'sd_zoo' / 'training' / 'time_budget.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- packages ---------------------------------------------------------------------------------------------

def version_tuple(version: Optional[str]) -> tuple:
    """(1, 0, 31) from '1.0.31', '1.0.31.dev0' or '1.0.31+local'; () for None."""
    return tuple(int(p) for p in re.findall(r'\d+', (version or '').split('+')[0])[:3])


def installed(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def minimum_timm() -> str:
    """The lowest timm the project accepts (pyproject.toml's ``timm>=X``)."""
    match = re.search(r'"timm>=([0-9.]+)', (REPO / 'pyproject.toml').read_text())
    return match.group(1) if match else '0'


def install_wheel(wheel: Path, site: Path) -> None:
    """Unpack a pure-Python wheel into ``site`` (put first on the path): no pip, no network, no root."""
    site.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)


def find_wheel(dist: str) -> Optional[Path]:
    pattern = dist.replace('-', '_') + '-*.whl'
    return next(iter(sorted((LEASE_DIR / 'wheels').glob(pattern))), None)


PACKAGES_VERSIONED = ('torch', 'torchvision', 'timm', 'onnxruntime', 'onnxruntime-gpu', 'onnx', 'onnxscript',
                      'onnx-ir', 'safetensors', 'huggingface_hub', 'matplotlib', 'tqdm', 'numpy', 'pillow')


# --- the probe worker (a subprocess; talks through stdin/stdout) ----------------------------------------------

def probe_worker(args: argparse.Namespace) -> int:
    """Train the model(s) on synthetic batches, then answer 'run RATES SECONDS' with images per model."""
    import torch
    import timm

    from sd_zoo import data
    from sd_zoo.training import train

    def say(obj) -> None:
        print(PROTOCOL + json.dumps(obj), flush=True)

    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device('cuda' if cuda else 'cpu')
    if cuda:
        torch.backends.cudnn.benchmark = True
    cfg = train.resolve_config(dict(recipe='fast', output='-', batch_size=args.batch))
    use_amp, channels_last = cfg['amp'] == 'bf16' and cuda, cfg['channels_last'] and cuda
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch * 4, 32, 32, 3), dtype=torch.uint8, generator=gen)
    loader = data.Loader(images, torch.randint(0, 10, (len(images),), generator=gen), args.batch, data.CIFAR10_MEAN,
                         data.CIFAR10_STD, train=True, device=device, channels_last=channels_last)
    batches = itertools.chain.from_iterable(map(loader.epoch, itertools.count()))
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    models = {}
    for rate in args.rates:
        torch.manual_seed(0)
        model = timm.create_model(args.model, num_classes=10, drop_path_rate=rate).to(device, memory_format=memory_format)
        model.set_gate_generator(torch.Generator().manual_seed(0))
        models[rate] = (model.train(), train.build_optimizer(model, cfg))
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def steps(rate: float, n: int) -> None:
        model, optimizer = models[rate]
        for _ in range(n):
            x, y = next(batches)
            train.train_step(model, optimizer, x, y, cfg['label_smoothing'], use_amp)

    for rate in models:  # autotuning and allocator growth happen here, untimed
        steps(rate, 5)
    sync()
    say(dict(ready=True, device=str(device), gpu=torch.cuda.get_device_name() if cuda else None))
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == 'quit':
            break
        rates, seconds = [float(r) for r in words[1].split(',')], float(words[2])
        images_done, busy = dict.fromkeys(rates, 0), dict.fromkeys(rates, 0.0)
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            for rate in rates:
                t = time.perf_counter()
                steps(rate, args.block)
                sync()
                busy[rate] += time.perf_counter() - t
                images_done[rate] += args.block * args.batch
        say(dict(elapsed_s=time.perf_counter() - start, images={str(r): n for r, n in images_done.items()},
                 busy_s={str(r): s for r, s in busy.items()}))
    return 0


class Worker:
    """A probe worker process and the lines it answers with."""

    def __init__(self, lease: 'Lease', rates: List[float], env: Dict[str, str], name: str):
        cmd = [sys.executable, str(Path(__file__).resolve()), '--probe-worker', '--model', lease.plan.model,
               '--batch', str(lease.plan.probe_batch), '--block', str(lease.plan.probe_block),
               '--rates', *map(str, rates)] + (['--cpu'] if lease.plan.dry else [])
        self.name = name
        self.log = open(lease.work / f'probe_{name}.log', 'w')
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, bufsize=1)
        lease.children.append(self.proc)
        self.lines: 'queue.Queue[str]' = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(PROTOCOL):
                self.lines.put(line[len(PROTOCOL):])
        self.lines.put('')  # the process ended

    def answer(self, timeout: float) -> Dict:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f'probe worker {self.name} gave no answer in {timeout:.0f} s') from None
        if not line:
            self.log.flush()
            tail = Path(self.log.name).read_text()[-600:]
            raise RuntimeError(f'probe worker {self.name} ended (rc {self.proc.wait()}): {tail}')
        return json.loads(line)

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + '\n')
        self.proc.stdin.flush()

    def close(self) -> None:
        try:
            self.send('quit')
            self.proc.wait(timeout=15)
        except (OSError, subprocess.TimeoutExpired, ValueError):
            self.proc.kill()
        self.log.close()


@contextlib.contextmanager
def started(workers: List[Worker], timeout: float):
    """The workers once all have warmed up (within ``timeout`` seconds each); closed afterwards."""
    try:
        for w in workers:
            w.answer(timeout=timeout)
        yield workers
    finally:
        for w in workers:
            w.close()


def pair_throughput(workers: List[Worker], window: float) -> float:
    """Images/s of two workers training at once, stochastic depth in the first and constant depth in the second."""
    for w, rate in zip(workers, ('0.5', '0.0')):
        w.send(f'run {rate} {window}')
    answers = [w.answer(timeout=window + 120) for w in workers]
    return sum(sum(a['images'].values()) for a in answers) / max(a['elapsed_s'] for a in answers)


# --- training runs ------------------------------------------------------------------------------------------

@dataclass
class Run:
    index: int
    key: str
    data: str
    rate: float
    folder: Path
    proc: Optional[subprocess.Popen] = None
    started: float = 0.0
    budget_s: float = 0.0
    epochs_cap: int = 0
    ended: Optional[float] = None
    packed_epochs: int = -1
    last_pack: float = 0.0
    result: Dict = field(default_factory=dict)

    @property
    def file_name(self) -> str:
        return f'run{self.index}_{self.key}.tar'

    def rows(self) -> List[Dict]:
        path = self.folder / 'metrics.jsonl'
        rows = []
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line being written
        return rows

    def read_json(self, name: str) -> Dict:
        try:
            return json.loads((self.folder / name).read_text())
        except (OSError, json.JSONDecodeError):
            return {}


class Lease:
    def __init__(self, plan: Plan, out: Path, work: Optional[Path] = None):
        self.plan, self.out = plan, out
        self.t0 = time.perf_counter() - _load_time_budget().process_age()
        self.work = work or Path(tempfile.mkdtemp(prefix='sd_zoo_lease_'))  # run folders, decoded data, logs
        self.children: List[subprocess.Popen] = []
        self.mps_env: Optional[Dict[str, str]] = None
        self.record: Dict = dict(dry_run=plan.dry, model=plan.model, timeout_s=plan.timeout_s, margin_s=plan.margin_s,
                                 started=time.strftime('%Y-%m-%dT%H:%M:%S%z'), errors=[], steps={})
        self.runs = [Run(i + 1, key, data, rate, self.work / 'runs' / key) for i, (key, data, rate) in enumerate(RUNS)]
        self.env = dict(os.environ, PYTHONUNBUFFERED='1', HF_HUB_OFFLINE='1',
                        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get('PYTHONPATH')])))
        if plan.dry:  # a small shared CPU: one thread per process
            self.env.setdefault('OMP_NUM_THREADS', '1')
        self.site: Optional[Path] = None

    # --- bookkeeping
    def now(self) -> float:
        return time.perf_counter() - self.t0

    def say(self, text: str) -> None:
        print(f'[{self.now():5.0f} s] {text}', flush=True)

    def error(self, where: str, err) -> None:
        text = f'{where}: {err}' if isinstance(err, str) else f'{where}: {type(err).__name__}: {err}'
        self.record['errors'].append(text)
        self.say(f'ERROR {text}')

    def write(self) -> None:
        self.record['elapsed_s'] = round(self.now(), 1)
        tmp = self.out / '.lease.json.tmp'
        tmp.write_text(json.dumps(self.record, indent=1, default=str) + '\n')
        os.replace(tmp, self.out / 'lease.json')

    def step(self, name: str, fn) -> None:
        """One phase; its failure is recorded and the lease goes on."""
        start = self.now()
        try:
            fn()
        except Exception as e:  # the lease records every failure rather than stopping
            self.error(name, e)
        self.record['steps'][name] = dict(start_s=round(start, 1), seconds=round(self.now() - start, 1))
        self.write()

    def python(self, *args: str, timeout: float, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, **kw)

    # --- 1. environment and packages
    def environment(self) -> None:
        self.record['versions'] = dict(python=platform.python_version(),
                                       **{d: installed(d) for d in PACKAGES_VERSIONED})
        self.record['machine'] = dict(cpus=os.cpu_count(), platform=platform.platform())
        probe = ('import json, torch; c = torch.cuda.is_available(); p = torch.cuda.get_device_properties(0) if c '
                 'else None; print(json.dumps(dict(torch=torch.__version__, cuda=torch.version.cuda, available=c, '
                 'count=torch.cuda.device_count(), name=p and p.name, memory_gib=p and round(p.total_memory / 2**30, 1), '
                 'capability=p and f"{p.major}.{p.minor}", cudnn=torch.backends.cudnn.version() if c else None)))')
        inspect = subprocess.Popen([sys.executable, '-c', probe], env=self.env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        try:
            self.ensure_packages()  # meanwhile
        finally:
            self.show_environment(inspect)
        self.say(f"packages used: {json.dumps(self.record['packages'])}")

    def show_environment(self, inspect: subprocess.Popen) -> None:
        stdout, stderr = inspect.communicate(timeout=180)
        gpu = json.loads(stdout.strip().splitlines()[-1]) if inspect.returncode == 0 else {}
        if inspect.returncode:
            self.error('gpu', stderr.strip()[-400:])
        smi = shutil.which('nvidia-smi')
        if smi:
            query = subprocess.run([smi, '--query-gpu=driver_version,compute_mode,mig.mode.current',
                                    '--format=csv,noheader'], capture_output=True, text=True, timeout=20)
            gpu['nvidia_smi'] = query.stdout.strip() or query.stderr.strip()[-200:]
        self.record['gpu'] = gpu
        v = self.record['versions']
        self.say(f"python {v['python']}, torch {v['torch']}, torchvision {v['torchvision']}, timm {v['timm']}, "
                 f"onnxruntime {v['onnxruntime'] or v['onnxruntime-gpu']}, onnx {v['onnx']}, onnxscript {v['onnxscript']}, "
                 f"safetensors {v['safetensors']}, huggingface_hub {v['huggingface_hub']}, matplotlib {v['matplotlib']}, "
                 f"tqdm {v['tqdm']}")
        self.say(f"GPU: {gpu.get('name') or 'none'} ({gpu.get('memory_gib')} GiB, sm {gpu.get('capability')}), "
                 f"CUDA {gpu.get('cuda')}, cuDNN {gpu.get('cudnn')}, nvidia-smi: {gpu.get('nvidia_smi', 'absent')}")
        if not gpu.get('available') and not self.plan.dry:
            self.error('gpu', 'torch sees no CUDA device: the runs train on the CPU and the GPU timings are skipped')

    def ensure_packages(self) -> None:
        """The machine's packages where they suffice, else the carried wheels (unpacked to a site folder)."""
        use = self.record['packages'] = {}
        wanted = dict(timm=minimum_timm(), tqdm='4.60', onnxscript='0.2')
        for dist, minimum in wanted.items():
            have = installed(dist)
            if have and version_tuple(have) >= version_tuple(minimum):
                use[dist] = have
            else:
                use[dist] = self.use_wheel(dist, f'{have or "missing"}, needs >= {minimum}')
        if importlib.util.find_spec('matplotlib') is None:
            self.error('packages', 'matplotlib is missing: the runs train without curves.png')
        smoke = ['-c', f'import sd_zoo, timm; timm.create_model("{self.plan.model}")']
        result = self.python(*smoke, timeout=180)
        if result.returncode and 'carried' not in str(use['timm']):
            # A timm new enough by its number may still lack what sd_zoo uses: try the carried one.
            use['timm'] = self.use_wheel('timm', f'{use["timm"]}, sd_zoo does not import with it')
            result = self.python(*smoke, timeout=180)
        if result.returncode:
            raise RuntimeError(f'sd_zoo does not import here: {result.stderr.strip()[-500:]}')

    def use_wheel(self, dist: str, why: str) -> str:
        """Unpack the carried wheel of ``dist`` (and onnxscript's onnx-ir) first on every subprocess's path."""
        wheels = [find_wheel(d) for d in [dist] + (['onnx-ir'] if dist == 'onnxscript' else [])]
        if not all(wheels):
            if dist != 'onnxscript':  # without onnxscript the exporter falls back to TorchScript
                self.error('packages', f'{dist}: {why}, and no wheel in .lease/wheels (benchmarks/gpu_lease_prepare.sh)')
            return f'{why}; no wheel'
        self.site = self.work / 'site'
        for wheel in wheels:
            install_wheel(wheel, self.site)
        self.env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(self.site), str(REPO), os.environ.get('PYTHONPATH')]))
        return f'{wheels[0].name.split("-")[1]} (carried wheel; here: {why})'

    # --- 2. data and the sharing probe, at once
    def data_and_probe(self) -> None:
        carried = LEASE_DIR / 'data'
        if all((carried / f'{name}.tar.gz').is_file() for name in ARCHIVES):
            self.env['SD_ZOO_DATA'] = str(carried)
        elif not self.env.get('SD_ZOO_DATA'):
            self.env['SD_ZOO_DATA'] = str(REPO.parent / 'shared' / 'data')
        if not self.plan.dry and not self.env.get('SD_ZOO_CACHE'):
            self.env['SD_ZOO_CACHE'] = str(self.work / 'cache')
        self.record['data'] = dict(folder=self.env['SD_ZOO_DATA'], cache=self.env.get('SD_ZOO_CACHE', 'default'))
        decode = ('import sys, time; t = time.perf_counter(); from sd_zoo import data; '
                  'data.load_split(sys.argv[1], "train"); print(f"{time.perf_counter() - t:.1f}")')
        decoders = {name: subprocess.Popen([sys.executable, '-c', decode, name], env=self.env, stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True) for name in ARCHIVES}
        self.children += list(decoders.values())
        self.step('sharing_probe', self.sharing_probe)
        for name, proc in decoders.items():
            try:
                output, _ = proc.communicate(timeout=max(10.0, self.train_end() - self.now()))
            except subprocess.TimeoutExpired:
                proc.kill()
                output = 'timed out'
            self.record['data'][name] = dict(rc=proc.returncode)
            if proc.returncode:
                self.error(f'decode {name}', output.strip()[-400:])
            else:  # its own clock: this wait began only after the probe
                self.record['data'][name]['seconds'] = float(output.split()[-1])
        self.say(f"data decoded: {json.dumps({n: self.record['data'][n] for n in ARCHIVES})}")

    def sharing_probe(self) -> None:
        """Throughput of one process (alternating stochastic and constant depth) against two at once."""
        plan, probe = self.plan, {}
        self.record['sharing'] = probe
        window = plan.probe_s
        with started([Worker(self, [0.5, 0.0], self.env, 'a'), Worker(self, [0.0], self.env, 'b')], 150) as workers:
            workers[0].send(f'run 0.5,0.0 {window}')
            single = workers[0].answer(timeout=window + 120)
            pair = pair_throughput(workers, window)
        ips = {r: single['images'][r] / single['busy_s'][r] for r in ('0.5', '0.0')}
        probe.update(
            one_process_images_per_s=sum(single['images'].values()) / single['elapsed_s'],
            two_processes_images_per_s=pair,
            sd_images_per_s=ips['0.5'], cd_images_per_s=ips['0.0'], sd_over_cd=ips['0.5'] / ips['0.0'],
            batch=plan.probe_batch, window_s=window)
        options = {'sequential': probe['one_process_images_per_s'], 'two processes': probe['two_processes_images_per_s']}
        mps = self.try_mps(window)
        if mps:
            options['mps'] = mps
        best = max(options, key=options.get)
        chosen = best if options[best] >= CONCURRENCY_GAIN * options['sequential'] else 'sequential'
        probe.update(options_images_per_s=options, chosen=chosen)
        if chosen != 'mps':
            self.stop_mps()
        self.say(f"sharing: {', '.join(f'{k} {v:.0f} img/s' for k, v in options.items())} -> {chosen}; one process: "
                 f"stochastic depth {ips['0.5']:.0f} img/s, constant depth {ips['0.0']:.0f} img/s "
                 f"(x{probe['sd_over_cd']:.3f})")

    def try_mps(self, window: float) -> Optional[float]:
        """Two processes under a CUDA MPS daemon of our own (private pipe folder), if the machine has one."""
        control = shutil.which('nvidia-cuda-mps-control')
        if self.plan.dry or not control:
            self.record['sharing']['mps'] = 'not offered (no nvidia-cuda-mps-control)' if not control else 'dry run'
            return None
        env = dict(self.env, CUDA_MPS_PIPE_DIRECTORY=str(self.work / 'mps_pipe'),
                   CUDA_MPS_LOG_DIRECTORY=str(self.work / 'mps_log'))
        for key in ('CUDA_MPS_PIPE_DIRECTORY', 'CUDA_MPS_LOG_DIRECTORY'):
            Path(env[key]).mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run([control, '-d'], env=env, check=True, timeout=20, capture_output=True)
            self.mps_env = env
            with started([Worker(self, [0.5], env, 'mps_a'), Worker(self, [0.0], env, 'mps_b')], 60) as workers:
                pair = pair_throughput(workers, window)
        except Exception as e:  # MPS is an option, not a requirement
            self.record['sharing']['mps'] = f'failed: {type(e).__name__}: {str(e)[:300]}'
            self.stop_mps()
            return None
        self.record['sharing']['mps'] = 'measured'
        return pair

    def stop_mps(self) -> None:
        if self.mps_env:
            subprocess.run([shutil.which('nvidia-cuda-mps-control') or 'nvidia-cuda-mps-control'], input='quit\n',
                           env=self.mps_env, text=True, timeout=20, capture_output=True)
            self.mps_env = None

    # --- 3. training
    def train_end(self) -> float:
        return self.plan.timeout_s - self.plan.margin_s - self.plan.inference_s

    def train_all(self) -> None:
        sharing = self.record.get('sharing', {}).get('chosen', 'sequential')
        pairs = [self.runs[i:i + 2] for i in range(0, len(self.runs), 2)]
        for p, (sd, cd) in enumerate(pairs):
            pair_time = (self.train_end() - self.now()) / (len(pairs) - p)
            pair_end = self.now() + pair_time
            if sharing == 'sequential':
                # Split the pair's time so that both can train the same epochs: by their measured speeds.
                ratio = self.record.get('sharing', {}).get('sd_over_cd') or 1.25
                setup = self.plan.setup_s
                self.train([sd], setup + (pair_time - 2 * setup) / (1 + ratio), self.plan.epochs_cap)
                # The partner's epochs as the cap, and its warm-up: the same schedule if they fit.
                cap = sd.result.get('epochs_run') or self.plan.epochs_cap
                warmup = sd.result.get('warmup_epochs')
                self.train([cd], pair_end - self.now(), cap, () if warmup is None else ('--warmup-epochs', str(warmup)))
            else:
                self.train([sd, cd], pair_time, self.plan.epochs_cap)
        self.stop_mps()  # the inference benchmark runs as an ordinary CUDA process

    def train(self, runs: List[Run], budget: float, epochs_cap: int, extra: tuple = ()) -> None:
        if budget < self.plan.min_budget_s:
            for run in runs:
                run.result = dict(status='skipped', why=f'only {budget:.0f} s left')
                self.record.setdefault('runs', {})[run.key] = run.result
                self.say(f'{run.key}: skipped, only {budget:.0f} s left')
            return
        env = self.mps_env or self.env
        for run in runs:
            run.folder.mkdir(parents=True, exist_ok=True)
            run.budget_s, run.epochs_cap, run.started = budget, epochs_cap, self.now()
            cmd = [sys.executable, '-m', 'sd_zoo.cli', 'train', '--model', self.plan.model, '--data', run.data,
                   '--recipe', 'fast', '--drop-path-rate', str(run.rate), '--seed', '0', '--time-budget', f'{budget:.0f}',
                   '--epochs', str(epochs_cap), '--output', str(run.folder), *self.plan.train_args, *extra]
            log = open(run.folder / 'train.log', 'w')
            run.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
            log.close()
            self.children.append(run.proc)
            self.say(f'{run.key}: {run.data}, drop_path_rate {run.rate}, time budget {budget:.0f} s, '
                     f'at most {epochs_cap} epochs')
        hard_stop = self.plan.timeout_s - self.plan.margin_s
        while any(r.proc.poll() is None for r in runs):
            time.sleep(1.0)
            for run in runs:
                if run.proc.poll() is not None and run.ended is None:
                    run.ended = self.now()
                late = self.now() > min(run.started + run.budget_s + self.plan.grace_s, hard_stop)
                if run.proc.poll() is None and late:
                    self.error(run.key, f'still running {self.now() - run.started:.0f} s after its start '
                                        f'(budget {run.budget_s:.0f} s): stopped')
                    stop(run.proc)
                self.pack(run)
        for run in runs:
            self.finish(run)

    def pack(self, run: Run, final: bool = False) -> None:
        """Rewrite the run's file in $OUT when epochs were added (at most every pack_every_s, unless final)."""
        rows = run.rows()
        if not final and (len(rows) == run.packed_epochs or self.now() - run.last_pack < self.plan.pack_every_s):
            return
        run.packed_epochs, run.last_pack = len(rows), self.now()
        names = ['metrics.jsonl', 'run.json', 'summary.json', 'curves.png', 'best.safetensors', 'final.safetensors']
        files = [run.folder / n for n in names if (run.folder / n).is_file()]
        log = (run.folder / 'train.log').read_bytes()[-200_000:] if (run.folder / 'train.log').exists() else b''
        total = sum(f.stat().st_size for f in files) + len(log) + 64 * 1024  # tar headers and padding
        dropped = [f.name for f in files if f.name == 'final.safetensors' and total > MAX_BYTES]
        files = [f for f in files if f.name not in dropped]
        tmp = self.out / f'.{run.file_name}.tmp'
        with tarfile.open(tmp, 'w') as tar:
            for f in files:
                try:
                    tar.add(f, arcname=f'{run.key}/{f.name}')
                except FileNotFoundError:
                    continue  # replaced between listing and reading (atomic writes)
            info = tarfile.TarInfo(f'{run.key}/train.log')
            info.size, info.mtime = len(log), int(time.time())
            tar.addfile(info, io.BytesIO(log))
        os.replace(tmp, self.out / run.file_name)
        if dropped:
            self.record.setdefault('dropped_files', {})[run.key] = dropped
        if rows:
            last = rows[-1]
            planned = run.read_json('run.json').get('config', {}).get('epochs', '?')
            test = last.get('test_err')
            self.say(f"{run.key}: epoch {last['epoch']}/{planned}, test {'-' if test is None else f'{test:.2f}%'}, "
                     f"{last['images_per_s']:.0f} img/s -> {run.file_name}")
        self.write()

    def finish(self, run: Run) -> None:
        self.pack(run, final=True)
        rows, summary = run.rows(), run.read_json('summary.json')
        budget = summary.get('time_budget') or run.read_json('run.json').get('time_budget') or {}
        speeds = [r['images_per_s'] for r in rows[1:] or rows]  # the first epoch includes warm-up
        run.result = dict(
            status={0: 'finished'}.get(run.proc.returncode) or (
                'stopped' if run.proc.returncode < 0 else f'failed rc {run.proc.returncode}'),
            data=run.data, drop_path_rate=run.rate, file=run.file_name, budget_s=round(run.budget_s, 1),
            epochs_cap=run.epochs_cap, epochs=budget.get('epochs'), epochs_run=len(rows),
            warmup_epochs=summary.get('config', {}).get('warmup_epochs'),
            stopped_early=budget.get('stopped_early'),
            images_per_s=statistics.median(speeds) if speeds else None,
            probe_images_per_s=budget.get('images_per_s'),
            blocks_executed=statistics.mean(r['blocks_executed_measured'] for r in rows) if rows else None,
            blocks_expected=rows[-1]['blocks_expected'] if rows else None,
            best_val_epoch=summary.get('best_val_epoch'), test_err_at_best_val=summary.get('test_err_at_best_val'),
            final_test_err=summary.get('final_test_err'), wall_s=round((run.ended or self.now()) - run.started, 1))
        if run.proc.returncode:
            log = run.folder / 'train.log'
            self.error(run.key, (log.read_text()[-600:] if log.exists() else '').strip())
        self.record.setdefault('runs', {})[run.key] = run.result
        self.say(f"{run.key}: {run.result['status']}, {run.result['epochs_run']} epochs in {run.result['wall_s']:.0f} s")
        self.write()

    # --- 4. inference
    def inference(self) -> None:
        left = self.plan.timeout_s - self.plan.margin_s - self.now()
        if left < 20:
            self.record['inference'] = dict(skipped=f'out of time ({left:.0f} s left)')
            return
        best = self.runs[0].folder / 'best.safetensors'
        out = self.work / 'inference.json'
        cmd = [str(REPO / 'benchmarks' / 'gpu_onnx_bench.py'), '--model', self.plan.model, '--output', str(out),
               '--time-limit', str(round(left - 15))] + (['--checkpoint', str(best)] if best.is_file() else [])
        cmd += ['--dry-run'] if self.plan.dry else []
        try:
            result = self.python(*cmd, timeout=left - 5)
            if result.returncode:
                tails = f'{result.stdout.strip()[-300:]} {result.stderr.strip()[-300:]}'
                self.error('inference', f'rc {result.returncode}: {tails}')
        except subprocess.TimeoutExpired:
            self.error('inference', f'stopped after {left - 5:.0f} s')
        self.record['inference'] = json.loads(out.read_text()) if out.exists() else {}

    # --- 5. the end
    def check_out(self) -> List[str]:
        """What in $OUT breaks the limits on what comes back."""
        problems, files = [], [p for p in self.out.rglob('*') if p.is_file()]
        if len(files) > MAX_FILES:
            problems.append(f'{len(files)} files in $OUT, at most {MAX_FILES} come back')
        for path in files:
            rel = path.relative_to(self.out)
            if path.stat().st_size > MAX_BYTES:
                problems.append(f'{rel} is {path.stat().st_size / 2 ** 20:.1f} MiB, over 16 MiB')
            if len(rel.parts) > 3 or not all(NAME_OK.fullmatch(p) for p in rel.parts):
                problems.append(f'{rel}: too deep or a name with other characters than letters, digits, . _ -')
        return problems

    def table(self) -> str:
        r, lines = self.record, []
        gpu, sharing = r.get('gpu', {}), r.get('sharing', {})
        lines.append(f"{'DRY RUN on the CPU: ' if r['dry_run'] else ''}{r['model']} on {gpu.get('name') or 'CPU'}, torch "
                     f"{r.get('versions', {}).get('torch')}, cuDNN {gpu.get('cudnn')}, sharing: {sharing.get('chosen', '?')} "
                     f"({', '.join(f'{k} {v:.0f}' for k, v in sharing.get('options_images_per_s', {}).items())} img/s)")
        if sharing.get('sd_over_cd'):
            lines.append(f"probe, one process: stochastic depth {sharing['sd_images_per_s']:.0f} img/s, constant depth "
                         f"{sharing['cd_images_per_s']:.0f} img/s: x{sharing['sd_over_cd']:.3f} (batch {sharing['batch']})")
        lines.append(f"{'run':8} {'status':12} {'epochs':>7} {'img/s':>8} {'test err':>9} {'final':>7} {'wall s':>7}  file")
        for key, run in r.get('runs', {}).items():
            pct = (lambda v: '-' if v is None else f'{v:.2f}%')
            ips = run.get('images_per_s')
            lines.append(f"{key:8} {run.get('status', '?')[:12]:12} {str(run.get('epochs_run', '-')):>7} "
                         f"{'-' if ips is None else f'{ips:.0f}':>8} {pct(run.get('test_err_at_best_val')):>9} "
                         f"{pct(run.get('final_test_err')):>7} {str(run.get('wall_s', '-')):>7}  {run.get('file', '')}")
        runs = r.get('runs', {})
        for data_key in ('c10', 'c100'):
            sd, cd = runs.get(f'{data_key}_sd', {}), runs.get(f'{data_key}_cd', {})
            if sd.get('images_per_s') and cd.get('images_per_s'):
                lines.append(f'{data_key}: stochastic / constant depth images/s in training: '
                             f"x{sd['images_per_s'] / cd['images_per_s']:.3f}")
        inference = r.get('inference', {})
        sizes = inference.get('batch_sizes', [])
        medians, notes = {}, []  # variant -> {batch: ms}; the first measurement of a variant is shown
        for section in ('torch_latency', 'ort_cpu_latency', 'compile_latency'):
            part = inference.get(section, {})
            for bs in sizes:
                for name, ms in part.get(str(bs), {}).get('median_ms', {}).items():
                    medians.setdefault(name, {}).setdefault(bs, ms)
            skipped = part.get('skipped')
            notes += [f'{k}: {v}' for k, v in skipped.items()] if isinstance(skipped, dict) else []
            if isinstance(skipped, str) or 'error' in part:
                notes.append(f"{section}: {skipped or part.get('error')}")
        if medians:
            lines.append(f"{'inference, median ms':26}" + ''.join(f'{f"batch {bs}":>12}' for bs in sizes))
            lines += [f'{name:26}' + ''.join(f'{by.get(bs, float("nan")):12.3f}' for bs in sizes)
                      for name, by in medians.items()]
        lines += [f'inference {note}' for note in notes]
        if inference.get('missing', {}).get('ort_cuda'):
            lines.append(f"ORT CUDA: {inference['missing']['ort_cuda']}")
        errors = [e[:300].replace('\n', ' | ') for e in r['errors']]
        lines.append(f'errors: {len(errors)}' + ''.join(f'\n  {e}' for e in errors))
        lines.append(f"$OUT: {', '.join(sorted(p.name for p in self.out.iterdir()))}; {r['elapsed_s']:.0f} s of "
                     f"{r['timeout_s']:.0f}")
        return '\n'.join(lines)

    def close(self) -> None:
        for run in self.runs:
            if run.proc is not None and not run.result:  # started and never finished: the lease was stopped
                if run.proc.poll() is None:
                    stop(run.proc)
                self.finish(run)
        for proc in self.children:
            if proc.poll() is None:
                stop(proc)
        self.stop_mps()


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--probe-worker', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--model', help=argparse.SUPPRESS)
    p.add_argument('--batch', type=int, help=argparse.SUPPRESS)
    p.add_argument('--block', type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument('--rates', type=float, nargs='+', help=argparse.SUPPRESS)
    p.add_argument('--cpu', action='store_true', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe_worker:
        return probe_worker(args)
    if not os.environ.get('OUT'):
        print('gpu_lease: error: set OUT to the folder whose files come back (OUT=$(mktemp -d) for a dry run)',
              file=sys.stderr)
        return 2
    out = Path(os.environ['OUT'])
    out.mkdir(parents=True, exist_ok=True)
    lease = Lease(Plan.from_env(), out)
    # The command's timeout may arrive as SIGTERM: leave lease.json and the files as they are, end the children.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        lease.step('environment', lease.environment)
        lease.step('data', lease.data_and_probe)
        lease.step('training', lease.train_all)
        lease.step('inference', lease.inference)
    except SystemExit:
        lease.error('lease', f'stopped from outside (SIGTERM) after {lease.now():.0f} s')
        raise
    finally:
        lease.close()
        for problem in lease.check_out():
            lease.error('$OUT', problem)
        lease.write()
        print(lease.table(), flush=True)
        shutil.rmtree(lease.work, ignore_errors=True)  # everything worth keeping is in $OUT
    return 1 if lease.record['errors'] else 0


if __name__ == '__main__':
    sys.exit(main())
