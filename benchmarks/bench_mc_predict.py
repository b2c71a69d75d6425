"""Cost of a Monte-Carlo depth ensemble: images/s of ``sd_zoo.mc_predict`` with N samples against one
deterministic (expected-value) pass of the same model, timed alternately in one run.

N samples cost N forward passes, but with the paper's batch gate each pass skips the dropped branches, so
one sample of sd_resnet20 (p_L = 0.5, expected depth 6.5 of 9 blocks) costs less than the deterministic
pass; a per-sample gate computes every branch, and a constant-depth model runs every block.

    python benchmarks/bench_mc_predict.py [--batch-size 256] [--samples 1 10 30] [--repeats 5] [--threads 1]
"""
import argparse
import statistics
import time

import timm
import torch

import sd_zoo
from sd_zoo.evaluation.uncertainty import depth_sampling


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(label, model, x, samples, repeats):
    """images/s of the deterministic pass and of each N-sample ensemble, and their time ratios.

    Each ensemble run is bracketed by two deterministic passes and divided by their mean, so that the
    ratio compares runs made under the same load (this machine is shared); the median over repeats is shown.
    """
    det_times, times, ratios = [], {n: [] for n in samples}, {n: [] for n in samples}
    with torch.no_grad():
        model(x)  # warm-up
        for i in range(repeats):
            for n in (samples if i % 2 == 0 else samples[::-1]):
                # The same seed in every repeat: repeats differ by machine noise, not by which blocks were dropped.
                gen = torch.Generator().manual_seed(0)
                before = timed(lambda: model(x))
                t = timed(lambda: sd_zoo.mc_predict(model, x, samples=n, generator=gen))
                after = timed(lambda: model(x))
                det_times += [before, after]
                times[n].append(t)
                ratios[n].append(t / ((before + after) / 2))
    print(f'{label}: deterministic pass {len(x) / statistics.median(det_times):8.1f} images/s')
    for n in samples:
        ratio = statistics.median(ratios[n])
        print(f'  {n:3d} samples {len(x) / statistics.median(times[n]):8.1f} images/s   '
              f'time / deterministic {ratio:6.2f}   per sample {ratio / n:.3f}')


def stage_costs(model, x, repeats):
    """Time of a pass with the blocks of one stage dropped, over a pass with every block kept."""
    gates = model.stochastic_depth_modules()
    stages = [len(getattr(model, f'layer{i + 1}')) for i in range(model.num_stages)]
    configs = {'none': [True] * len(gates)}
    start = 0
    for i, size in enumerate(stages):
        configs[f'stage {i + 1}'] = [not start <= j < start + size for j in range(len(gates))]
        start += size
    times = {k: [] for k in configs}

    def run(keep):
        # Called as model(x) in eval mode the model plans nothing, so each block takes the gate set here.
        for g, k in zip(gates, keep):
            g.planned = k
        return timed(lambda: model(x))

    with torch.no_grad(), depth_sampling(model):
        for _ in range(repeats):
            for k, keep in configs.items():
                times[k].append(run(keep))
    full = statistics.median(times['none'])
    print('  time of a pass with these blocks dropped / all kept: ' + ', '.join(
        f'{k} {statistics.median(times[k]) / full:.2f}' for k in configs if k != 'none'))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--threads', type=int, default=None, help='torch intra-op threads (default: torch)')
    parser.add_argument('--batch-size', type=int, default=256)
    parser.add_argument('--samples', type=int, nargs='+', default=[1, 10, 30])
    parser.add_argument('--repeats', type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads or torch.get_num_threads())
    x = torch.randn(args.batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    print(f'torch {torch.__version__}, timm {timm.__version__}, threads {torch.get_num_threads()}, '
          f'batch {args.batch_size}, median of {args.repeats} alternating runs, CPU')
    sd = sd_zoo.load_model('sd_resnet20.c10j75')
    print(f'sd_resnet20.c10j75: expected depth {sd.expected_depth:.2f} of {sd.num_blocks} blocks '
          f'({sd.expected_depth / sd.num_blocks:.3f})')
    compare('sd_resnet20.c10j75 (batch gate, as trained)', sd, x, args.samples, args.repeats)
    stage_costs(sd, x, args.repeats)
    compare('sd_resnet20.c10j75 with a per-sample gate', sd_zoo.load_model('sd_resnet20.c10j75', sd_gate='sample'),
            x, args.samples, args.repeats)
    compare('sd_resnet20.c10j75_cd (constant depth)', sd_zoo.load_model('sd_resnet20.c10j75_cd'), x,
            args.samples, args.repeats)


if __name__ == '__main__':
    main()
