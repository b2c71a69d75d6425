"""Train-step time of stochastic depth over constant depth, measured alternately in one run.

For sd_resnet110 (batch gate: dropped branches are skipped) the ratio should approach the expected
depth fraction 40.25 / 54 = 0.745 plus the fixed cost of stem and head; timm's ResNet with its DropPath
(a per-sample mask: every branch is still computed) gives about 1.0. Our per-sample gate is shown too.

    python benchmarks/bench_sd_speed.py [--batch-size 128] [--repeats 7] [--threads N]
"""
import argparse
import statistics
import time

import timm
import torch

import sd_zoo  # noqa: F401


def train_step_time(model, x, y, opt) -> float:
    start = time.perf_counter()
    opt.zero_grad(set_to_none=False)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    return time.perf_counter() - start


def compare(name, make_model, x, y, repeats, warmup=2):
    """Median train-step time with drop_path_rate 0.5 over that with 0.0, steps interleaved."""
    models = {rate: make_model(rate).train() for rate in (0.5, 0.0)}
    opts = {rate: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
            for rate, m in models.items()}
    times = {0.5: [], 0.0: []}
    for i in range(warmup + repeats):
        for rate in (0.5, 0.0) if i % 2 == 0 else (0.0, 0.5):
            t = train_step_time(models[rate], x, y, opts[rate])
            if i >= warmup:
                times[rate].append(t)
    sd, const = statistics.median(times[0.5]), statistics.median(times[0.0])
    print(f'{name:<44} SD {sd * 1e3:8.1f} ms   constant {const * 1e3:8.1f} ms   ratio {sd / const:.3f}')
    return sd / const


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--repeats', type=int, default=7)
    parser.add_argument('--threads', type=int, default=None, help='torch intra-op threads (default: torch)')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch_size,))
    print(f'torch {torch.__version__}, timm {timm.__version__}, threads {torch.get_num_threads()}, '
          f'batch {args.batch_size}, median of {args.repeats} alternating train steps')
    expected = timm.create_model('sd_resnet110').expected_depth / 54
    print(f'expected-depth fraction of sd_resnet110: {expected:.3f}')
    compare('sd_resnet110, batch gate (paper)', lambda r: timm.create_model('sd_resnet110', drop_path_rate=r),
            x, y, args.repeats)
    compare('sd_resnet110, per-sample gate', lambda r: timm.create_model(
        'sd_resnet110', drop_path_rate=r, sd_gate='sample'), x, y, args.repeats)
    compare('timm resnet18 + DropPath (32x32 input)', lambda r: timm.create_model(
        'resnet18', num_classes=10, drop_path_rate=r), x, y, args.repeats)


if __name__ == '__main__':
    main()
